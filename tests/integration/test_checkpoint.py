"""Checkpoints: every strategy's state (the rule's global state with its base history, Fed-SB's
fixed factors and cores, the expected probes, client-level DP's accountant) survives a round
trip through the files exactly, and a run resumed from its checkpoint after a crash ends with the
rows and the state of the uninterrupted run (the in-process grid, no Ray)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from clients.app import client_app
from clients.node_store import NODES_DIR, STATE_DIR_KEY
from fedlora.config import RunConfig
from strategies import STRATEGIES, server_app
from strategies.checkpoint import checkpoint_rounds, read_checkpoint, write_checkpoint
from strategies.run_record import FINISHED, read_manifest, read_status
from strategies.server_app import make_strategy, run
from tests.support.local_grid import LocalGrid
from tests.support.timing import TIMING
from tests.support.tiny_runs import TINY_BERT_RUN

pytestmark = pytest.mark.usefixtures("task_identity", "one_thread")

TINY_RUN = {
    **TINY_BERT_RUN,
    "num-server-rounds": 2,
}
CLIENT_DP = {"dp-client": True, "dp-client-clip": 0.5, "dp-client-noise-multiplier": 0.3}


def run_in_process(run_dir, config, grid_class=LocalGrid, **keys):
    """A run of fresh nodes (the node stores hold what they keep across runs), as in
    simulation: the ClientApp knows the run directory; with base changes in the messages, as on
    devices, each node's store is its node config's ``state-dir``."""
    config = {**config, "run-dir": str(run_dir), **keys}
    grid = grid_class(client_app(config), num_nodes=2)
    if config.get("base-changes") == "messages":
        for context in grid.contexts.values():
            partition = context.node_config["partition-id"]
            context.node_config[STATE_DIR_KEY] = str(run_dir / "devices" / str(partition))
    return run(grid, config, flower_run_id=5)


def same_tensors(left: dict, right: dict) -> bool:
    return left.keys() == right.keys() and all(
        left[k].dtype == right[k].dtype and torch.equal(left[k], right[k]) for k in left
    )


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_s_state_survives_the_checkpoint_files(strategy, tmp_path):
    config = {**TINY_RUN, "strategy": strategy, "num-server-rounds": 1}
    if strategy in ("fedavg", "fedsa"):
        config.update({**CLIENT_DP, "dp-client-noise-seed": 3})
    ran = run_in_process(tmp_path, config)
    assert checkpoint_rounds(tmp_path) == [1]
    checkpoint = read_checkpoint(tmp_path)
    fresh = make_strategy(RunConfig.from_flower(config), ran.base_store)
    checkpoint.restore(fresh)
    tensors, facts = ran.state_dict()
    again_tensors, again_facts = fresh.state_dict()
    assert same_tensors(tensors, again_tensors)
    nodes = facts.pop("nodes")
    assert set(nodes) == {"0", "1"} and again_facts.pop("nodes") == {}  # asked again on resume
    assert checkpoint.strategy["nodes"] == nodes
    assert json.dumps(facts, sort_keys=True) == json.dumps(again_facts, sort_keys=True)
    assert ran.state.version == fresh.state.version == 1
    if ran.state.changes is not None:
        assert len(fresh.state.changes.rounds) == 1
    if ran.client_dp is not None:
        assert fresh.client_dp.epsilon() == ran.client_dp.epsilon() > 0
    assert [row["round"] for row in checkpoint.rows] == [1]


def crash_before_checkpoint(crash_round: int, states: list | None = None):
    """`write_checkpoint`, except that it stops the server (as a kill would) before writing
    round ``crash_round``'s: its row is written, the nodes hold their state of that round. The
    strategy's tensors at that point (those the checkpoint would have held) go to ``states``."""

    def write(run_dir, server_round, strategy, rows):
        if server_round == crash_round:
            if states is not None:
                states.append(strategy.state_dict()[0])
            raise KeyboardInterrupt
        return write_checkpoint(run_dir, server_round, strategy, rows)

    return write


def without(columns, rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in columns} for row in rows]


@pytest.mark.parametrize(
    ("strategy", "keys"),
    [
        ("fedex", {}),
        ("fedsa", {}),
        ("flora", {"base-changes": "messages"}),
        ("fedavg", CLIENT_DP),
        ("fedavg", {"dp-sample": True, "dp-noise-multiplier": 1.0}),
    ],
)
def test_a_resumed_run_ends_as_the_uninterrupted_one(strategy, keys, tmp_path, monkeypatch):
    """Round 3 of 3 stops before its checkpoint (its row is written, the nodes hold their
    round-3 state). Up to that point the run is the uninterrupted one: its three rows and the
    global state the checkpoint would have held are what the resumed run must end with. The
    resumed run (new nodes: only the files remain) drops the row, asks the nodes for their state
    as of round 2, repeats round 3 and ends with those rows (timings aside) and bitwise that
    global state: the nodes' stores give back FedSA-LoRA's personal B, the own drifted base of a
    node that gets base changes in messages, and the sample-level DP accountants (the same
    epsilon), all as of round 2."""
    config = {**TINY_RUN, "strategy": strategy, "num-server-rounds": 3, "seed": 4, **keys}
    if "dp-client" in keys:
        config["dp-client-noise-seed"] = 9
    uninterrupted = []
    with monkeypatch.context() as patch:
        patch.setattr(server_app, "write_checkpoint", crash_before_checkpoint(3, uninterrupted))
        with pytest.raises(KeyboardInterrupt):
            run_in_process(tmp_path, config)
    expected = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [row["round"] for row in expected] == [1, 2, 3]
    assert read_status(tmp_path) == "interrupted"
    assert checkpoint_rounds(tmp_path) == [1, 2]
    resumed = run_in_process(tmp_path, config, resume=True)
    assert read_status(tmp_path) == FINISHED
    assert len(read_manifest(tmp_path)["runs"]) == 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert without(TIMING, rows) == without(TIMING, expected)
    assert same_tensors(resumed.state_dict()[0], uninterrupted[0])


def test_a_node_whose_accountant_is_lost_refuses_to_train(tmp_path, monkeypatch):
    """Sample-level DP: partition 0's store is lost before the resume; the server saw it spend
    budget, so it refuses to train (its reply is dropped, naming why) instead of restarting
    its accountant at epsilon 0."""
    config = {**TINY_RUN, "strategy": "fedavg", "num-server-rounds": 3, "dp-sample": True}
    with monkeypatch.context() as patch:
        patch.setattr(server_app, "write_checkpoint", crash_before_checkpoint(3))
        with pytest.raises(KeyboardInterrupt):
            run_in_process(tmp_path, config)
    shutil.rmtree(tmp_path / NODES_DIR / "0")
    run_in_process(tmp_path, config, resume=True)
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["round"] == 3 and last["clients"] == 0
    (reason,) = last["dropped"].values()
    assert "partition 0 spent privacy budget before" in reason
    assert "accountant history is missing" in reason


def test_checkpoint_every_k_rounds_and_after_the_last(tmp_path):
    config = {**TINY_RUN, "strategy": "fedavg", "num-server-rounds": 3, "checkpoint-every": 2}
    run_in_process(tmp_path, config)
    assert checkpoint_rounds(tmp_path) == [2, 3]
    assert [row["round"] for row in read_checkpoint(tmp_path, 2).rows] == [1, 2]
