"""A federated run on packed rows (`pack-sequences`): the tiny Llama learning BBC News text under
FedEx-LoRA on the in-process grid stays exact, and its clients train other batches than unpacked
ones (full rows of max-length tokens, every position labelled)."""

from __future__ import annotations

import json

import pytest

from clients.app import client_app
from strategies.server_app import run
from tests.support.local_grid import LocalGrid

pytestmark = pytest.mark.usefixtures("task_identity", "one_thread")

RUN = {
    "model": "tiny-llama",
    "task": "causal-lm",
    "strategy": "fedex",
    "partitioner": "iid",
    "max-length": 32,
    "batch-size": 4,
    "local-steps": 2,
    "num-server-rounds": 2,
    "rank-profile": "2:0.5,4:0.5",
    "learning-rate": 0.01,
}


def rows_of(run_dir, **keys) -> list[dict]:
    config = {**RUN, "run-dir": str(run_dir), **keys}
    run(LocalGrid(client_app(config), num_nodes=2), config)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


def test_a_packed_run_stays_exact_and_trains_on_other_batches(tmp_path):
    packed = rows_of(tmp_path / "packed", **{"pack-sequences": True})
    (unpacked,) = rows_of(tmp_path / "unpacked", **{"num-server-rounds": 1})

    assert [row["round"] for row in packed] == [1, 2]
    assert all(row["clients"] == 2 and row["relative_deviation"] < 1e-5 for row in packed)
    assert packed[0]["train_loss"] != unpacked["train_loss"]
