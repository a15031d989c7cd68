"""Flower's grid with every message it sends and every reply it receives recorded, exchange by
exchange (as `tests.support.local_grid.LocalGrid` records its own)."""

from __future__ import annotations


class RecordingGrid:
    """Wraps the grid that Flower hands to a ServerApp."""

    def __init__(self, grid) -> None:
        self.grid = grid
        self.sent, self.replies, self.exchanges = [], [], []

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        self.sent.extend(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        self.exchanges.append((messages, replies))
        return replies
