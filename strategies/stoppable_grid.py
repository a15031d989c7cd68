"""A Grid that gives up waiting for replies once the simulation engine has stopped.

When Flower's simulation engine crashes (its Ray backend cannot start, say), `run_simulation`
raises in the caller's thread, but the ServerApp's thread goes on waiting for replies that will
never come (a strategy waits up to its round timeout, an hour by default), and the process cannot
exit. `StoppableGrid` waits for replies the way Flower's grid does, and raises `SimulationStopped`
as soon as the runner sets its stop event.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

PULL_INTERVAL = 0.1
"""Seconds between two pulls of the replies."""


class SimulationStopped(RuntimeError):
    """The simulation engine stopped while the ServerApp waited for replies."""


class StoppableGrid(Grid):
    """Flower's ``grid`` with a `send_and_receive` that ends when ``stop`` is set."""

    def __init__(self, grid: Grid, stop: threading.Event) -> None:
        self.grid = grid
        self.stop = stop

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages`` and pull their replies until all came, ``timeout`` seconds passed, or
        the stop event is set (`SimulationStopped`)."""
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting and (deadline is None or time.monotonic() < deadline):
            if self.stop.is_set():
                raise SimulationStopped("the simulation engine stopped; no more replies will come")
            pulled = list(self.pull_messages(waiting))
            replies.extend(pulled)
            waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
            if waiting:
                time.sleep(PULL_INTERVAL)
        return replies
