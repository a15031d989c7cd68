"""A node restarted in the middle of a run (a SuperNode process started again: its ``context.state``
is empty) with base changes in the messages, as on devices, on the in-process grid; and a node
that stopped, for which Flower's SuperLink answers with an error reply of its own.

With its ``state-dir`` the node goes on from its store's snapshot (base version and drifted base,
FedSA-LoRA's B) and the run ends as the uninterrupted one. Without it the node's first reply
fails (its payload's base change starts at the version it held before), the server asks it for
its facts again, and from the next round it catches up with every base change since version 0."""

from __future__ import annotations

import json
import uuid

import pytest
from flwr.app import Context, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server.superlink.linkstate.utils import (
    NODE_UNAVAILABLE_ERROR_REASON,
    create_message_error_unavailable_res_message,
)

from clients.app import client_app
from strategies.server_app import run
from tests.integration.test_checkpoint import TINY_RUN, run_in_process
from tests.support.local_grid import LocalGrid
from tests.support.timing import TIMING

pytestmark = pytest.mark.usefixtures("task_identity", "one_thread")

RUN = {
    **TINY_RUN,
    "num-server-rounds": 4,
    "min-train-nodes": 1,
    "seed": 4,
    "base-changes": "messages",
}
RESTART_ROUND = 3
"""Node 1 restarts after round 2, before its round-3 train message."""


class RestartingGrid(LocalGrid):
    """Node 1's Context is replaced by a fresh one (same node id and node config, empty state)
    before the train messages of `RESTART_ROUND`."""

    def __init__(self, app, num_nodes: int) -> None:
        super().__init__(app, num_nodes)
        self.train_exchanges = 0

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        if any(m.metadata.message_type == MessageType.TRAIN for m in messages):
            self.train_exchanges += 1
            if self.train_exchanges == RESTART_ROUND:
                node_id = sorted(self.contexts)[1]
                old = self.contexts[node_id]
                self.contexts[node_id] = Context(
                    run_id=old.run_id,
                    node_id=node_id,
                    node_config=dict(old.node_config),
                    state=RecordDict(),
                    run_config={},
                )
        return super().send_and_receive(messages, timeout)


class UnavailableNodeGrid(LocalGrid):
    """Gives each message its id when it is sent, as Flower's grids do, and answers node 1's
    first train message as Flower's SuperLink answers for a node that missed its heartbeats: an
    error reply whose source is the SuperLink (node id 1), naming the message it answers."""

    def __init__(self, app, num_nodes: int) -> None:
        super().__init__(app, num_nodes)
        self.dead = sorted(self.contexts)[1]
        self.answered_for_dead = False

    def deliver(self, message):
        message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        train = message.metadata.message_type == MessageType.TRAIN
        if train and message.metadata.dst_node_id == self.dead and not self.answered_for_dead:
            self.answered_for_dead = True
            return create_message_error_unavailable_res_message(message.metadata, "node_unavail")
        return super().deliver(message)


def rows_of(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


@pytest.mark.parametrize("strategy", ["fedex", "fedsa"])
def test_a_node_restarted_with_its_state_dir_goes_on_as_if_never_stopped(strategy, tmp_path):
    """Each node's store is its node config's ``state-dir`` (`run_in_process`)."""
    config = {**RUN, "strategy": strategy}

    run_in_process(tmp_path / "whole", config)
    run_in_process(tmp_path / "restarted", config, RestartingGrid)

    restarted = rows_of(tmp_path / "restarted")
    assert [row["clients"] for row in restarted] == [2, 2, 2, 2]
    assert restarted == rows_of(tmp_path / "whole")


def test_a_node_restarted_without_state_catches_up_from_version_0(tmp_path):
    config = {**RUN, "strategy": "fedex", "run-dir": str(tmp_path)}
    run(RestartingGrid(client_app(config), num_nodes=2), config, flower_run_id=5)

    rows = rows_of(tmp_path)

    assert [row["clients"] for row in rows] == [2, 2, 1, 2]
    (reason,) = rows[2]["dropped"].values()
    assert "base change starts at version 2 but this cache holds version 0" in reason
    assert rows[3]["relative_deviation"] < 1e-4


def test_the_superlinks_error_reply_for_a_dead_node_names_that_node(tmp_path):
    """The "Node Unavailable" reply comes from the SuperLink (source node id 1): the round's
    ``dropped`` names the node (and partition) its message was sent to, and that node, asked for
    its facts again, trains the next round."""
    config = {**RUN, "strategy": "fedex", "num-server-rounds": 2, "run-dir": str(tmp_path)}
    grid = UnavailableNodeGrid(client_app(config), num_nodes=2)
    run(grid, config, flower_run_id=5)

    rows = rows_of(tmp_path)

    assert grid.answered_for_dead
    assert [row["clients"] for row in rows] == [1, 2]
    assert rows[0]["dropped"] == {
        str(grid.dead): f"error reply of partition 1: {NODE_UNAVAILABLE_ERROR_REASON}"
    }
    assert str(SUPERLINK_NODE_ID) not in rows[0]["dropped"]
    assert rows[1]["dropped"] == {}
