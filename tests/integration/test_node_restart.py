"""A node restarted in the middle of a run (a SuperNode process started again: its ``context.state``
is empty) with base changes in the messages, as on devices, on the in-process grid.

With its ``state-dir`` the node goes on from its store's snapshot (base version and drifted base,
FedSA-LoRA's B) and the run ends as the uninterrupted one. Without it the node's first reply
fails (its payload's base change starts at the version it held before), the server asks it for
its facts again, and from the next round it catches up with every base change since version 0."""

from __future__ import annotations

import json

import pytest
from flwr.app import Context, MessageType, RecordDict

from clients.app import client_app
from clients.node_store import STATE_DIR_KEY
from strategies.server_app import run
from tests.support.local_grid import LocalGrid
from tests.support.timing import TIMING

pytestmark = pytest.mark.usefixtures("task_identity", "one_thread")

RUN = {
    "model": "tiny-bert",
    "partitioner": "iid",
    "max-length": 16,
    "batch-size": 4,
    "local-steps": 1,
    "rank-profile": "2:0.5,4:0.5",
    "learning-rate": 0.01,
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


def run_rows(grid_class, run_dir, config, state_dirs: bool) -> list[dict]:
    grid = grid_class(client_app(config), num_nodes=2)
    if state_dirs:
        for context in grid.contexts.values():
            partition = context.node_config["partition-id"]
            context.node_config[STATE_DIR_KEY] = str(run_dir / "devices" / str(partition))
    run(grid, {**config, "run-dir": str(run_dir)}, flower_run_id=5)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


@pytest.mark.parametrize("strategy", ["fedex", "fedsa"])
def test_a_node_restarted_with_its_state_dir_goes_on_as_if_never_stopped(strategy, tmp_path):
    config = {**RUN, "strategy": strategy}

    whole = run_rows(LocalGrid, tmp_path / "whole", config, state_dirs=True)
    restarted = run_rows(RestartingGrid, tmp_path / "restarted", config, state_dirs=True)

    assert [row["clients"] for row in restarted] == [2, 2, 2, 2]
    assert restarted == whole


def test_a_node_restarted_without_state_catches_up_from_version_0(tmp_path):
    rows = run_rows(RestartingGrid, tmp_path, {**RUN, "strategy": "fedex"}, state_dirs=False)

    assert [row["clients"] for row in rows] == [2, 2, 1, 2]
    (reason,) = rows[2]["dropped"].values()
    assert "base change starts at version 2 but this cache holds version 0" in reason
    assert rows[3]["relative_deviation"] < 1e-4
