"""The in-process grid (`simulations.in_process.InProcessGrid`) that also records every message
and reply, and each exchange. Messages need a task identity, which the `task_identity` fixture
sets for the test."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message

from simulations.in_process import FIRST_NODE_ID, InProcessGrid

__all__ = ["FIRST_NODE_ID", "LocalGrid"]


class LocalGrid(InProcessGrid):
    """Nodes FIRST_NODE_ID + i with partition id i; a failing ClientApp gives an error reply."""

    def __init__(self, app, num_nodes: int) -> None:
        super().__init__(app, num_nodes)
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self.exchanges: list[tuple[list[Message], list[Message]]] = []

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None):
        messages = list(messages)
        self.sent.extend(messages)
        replies = super().send_and_receive(messages, timeout)
        self.replies.extend(replies)
        self.exchanges.append((messages, replies))
        return replies
