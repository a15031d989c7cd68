"""A grid that hands each message to a ClientApp in this process, one Context per node, as
SuperNodes would (without Ray); it records every message and reply, and each exchange. Messages need a task
identity, which the `task_identity` fixture sets for the test."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

FIRST_NODE_ID = 1000


class LocalGrid:
    """Nodes FIRST_NODE_ID + i with partition id i; a failing ClientApp gives an error reply."""

    def __init__(self, app: ClientApp, num_nodes: int) -> None:
        self.app = app
        self.contexts = {
            FIRST_NODE_ID + i: Context(
                run_id=1,
                node_id=FIRST_NODE_ID + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self.exchanges: list[tuple[list[Message], list[Message]]] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None):
        messages = list(messages)
        replies = []
        for message in messages:
            self.sent.append(message)
            try:
                reply = self.app(message, self.contexts[message.metadata.dst_node_id])
            except Exception as error:  # noqa: BLE001 - a node's failure becomes its error reply
                reply = Message(Error(code=0, reason=repr(error)), reply_to=message)
            replies.append(reply)
        self.replies.extend(replies)
        self.exchanges.append((messages, replies))
        return replies
