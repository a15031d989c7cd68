"""``evaluate-every``: the clients get evaluate messages and the server evaluates only in rounds
k, 2k, ... and the last; the other rounds' rows hold nulls in the same columns, and a resumed run
keeps the schedule (the in-process grid, no Ray)."""

from __future__ import annotations

import json

import pytest
from flwr.app import MessageType

from clients.app import client_app
from fedlora.wire.messages import CONFIG_RECORD, ROUND_KEY
from simulations.run_dir import flat
from strategies import server_app
from strategies.checkpoint import write_checkpoint
from strategies.server_app import run
from tests.support.local_grid import LocalGrid
from tests.support.timing import TIMING
from tests.support.tiny_runs import TINY_BERT_RUN

pytestmark = pytest.mark.usefixtures("task_identity", "one_thread")

TINY_RUN = {
    **TINY_BERT_RUN,
    "strategy": "fedavg",
    "num-server-rounds": 3,
    "evaluate-every": 2,
}
EVALUATED = ("accuracy", "loss", "client_accuracy", "client_loss")
"""The columns that are null in a round without evaluation."""


def run_in_process(run_dir, config, **keys) -> LocalGrid:
    """A run of two fresh nodes; the grid that recorded its messages."""
    config = {**config, "run-dir": str(run_dir), **keys}
    grid = LocalGrid(client_app(config), num_nodes=2)
    run(grid, config, flower_run_id=5)
    return grid


def evaluate_rounds(grid: LocalGrid) -> list[int]:
    """The round of each evaluate message the nodes got."""
    return [
        int(message.content[CONFIG_RECORD][ROUND_KEY])
        for message in grid.sent
        if message.metadata.message_type == MessageType.EVALUATE
    ]


def read_rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


@pytest.mark.parametrize(
    ("strategy", "source", "skipped_by_rank"),
    [("fedavg", "server", {"2": None, "4": None}), ("fedsa", "clients", None)],
)
def test_rounds_between_evaluations_hold_nulls_in_the_same_columns(
    strategy, source, skipped_by_rank, tmp_path
):
    """Round 1 of 3 with ``evaluate-every = 2`` sends no evaluate message and writes nulls;
    round 2 (a multiple) and round 3 (the last) evaluate. FedSA-LoRA has no global model: its
    accuracy is the clients', null too when they do not evaluate."""
    grid = run_in_process(tmp_path, {**TINY_RUN, "strategy": strategy})
    assert evaluate_rounds(grid) == [2, 2, 3, 3]
    rows = read_rows(tmp_path)
    assert [row["round"] for row in rows] == [1, 2, 3]
    assert all(list(flat(row)) == list(flat(rows[0])) for row in rows)  # the CSV's columns
    skipped, *evaluated = rows
    assert all(skipped[column] is None for column in EVALUATED)
    assert skipped["accuracy_by_rank"] == skipped_by_rank
    assert skipped["accuracy_source"] == source and skipped["train_loss"] is not None
    assert skipped["bytes_down"] == sum(skipped["bytes_down_by_client"].values())  # train only
    for row in evaluated:
        assert all(isinstance(row[column], float) for column in EVALUATED)
        assert row["accuracy_source"] == source
        assert row["bytes_down"] > sum(row["bytes_down_by_client"].values())
        if skipped_by_rank is not None:
            assert set(row["accuracy_by_rank"]) == {"2", "4"}
            assert all(isinstance(value, float) for value in row["accuracy_by_rank"].values())


def test_a_resumed_run_keeps_the_evaluation_schedule(tmp_path, monkeypatch):
    """4 rounds, ``evaluate-every = 2``, stopped before round 2's checkpoint; the resumed run
    repeats round 2 and evaluates in rounds 2 and 4 only, ending with the uninterrupted run's
    rows (timings aside)."""
    config = {**TINY_RUN, "num-server-rounds": 4, "seed": 4}
    whole = run_in_process(tmp_path / "whole", config)
    assert evaluate_rounds(whole) == [2, 2, 4, 4]

    def stop_at_round_2(run_dir, server_round, strategy, rows):
        if server_round == 2:
            raise KeyboardInterrupt
        return write_checkpoint(run_dir, server_round, strategy, rows)

    with monkeypatch.context() as patch:
        patch.setattr(server_app, "write_checkpoint", stop_at_round_2)
        with pytest.raises(KeyboardInterrupt):
            run_in_process(tmp_path / "resumed", config)
    resumed = run_in_process(tmp_path / "resumed", config, resume=True)
    assert evaluate_rounds(resumed) == [2, 2, 4, 4]
    rows, expected = read_rows(tmp_path / "resumed"), read_rows(tmp_path / "whole")
    assert [row["accuracy"] is None for row in rows] == [True, False, True, False]
    drop = set(TIMING)
    assert [{k: v for k, v in row.items() if k not in drop} for row in rows] == [
        {k: v for k, v in row.items() if k not in drop} for row in expected
    ]
