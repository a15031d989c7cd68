"""Grouped training in the in-process engine (`[simulation] group-size`): a round's clients train
four at a time in one forward/backward over the shared frozen base, and the run ends as the same
run training one client at a time (float32: to rounding), for a method that drifts the base
(FedEx-LoRA), one whose clients keep A frozen (FFA-LoRA) and one whose clients keep their own B
(FedSA-LoRA); LEGEND's clients (ranks per layer) and Fed-SB's (no LoRA layers) cannot form a
group and train one at a time.
Mixed ranks 2 and 4 on the tiny Llama; its dropout is 0, so the steps are the same."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from clients.app import client_app
from fedlora.config import RunConfig
from fedlora.training.local import TrainReport
from fedlora.training.rendezvous import GroupSlot, TrainingJob
from simulations import in_process
from simulations.in_process import InProcessGrid
from strategies.server_app import run

pytestmark = pytest.mark.usefixtures("task_identity", "one_thread")

NODES = 4
GROUPS = {"fedex": [4, 2, 2], "ffalora": [4, 2, 2], "fedsa": [4, 4], "legend": [], "fedsb": []}
"""The groups that trained together, round by round."""
RUN = {
    "model": "tiny-llama",
    "task": "causal-lm",
    "partitioner": "iid",
    "max-length": 24,
    "batch-size": 3,
    "local-steps": 2,
    "num-server-rounds": 2,
    "rank-profile": "2:0.5,4:0.5",
    "learning-rate": 0.02,
    "seed": 3,
}


def run_grouped(run_dir, strategy: str, group_size: int) -> list[dict]:
    config = {**RUN, "strategy": strategy, "run-dir": str(run_dir)}
    run(InProcessGrid(client_app(config), NODES, group_size), config)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


@pytest.mark.parametrize("strategy", ["fedex", "ffalora", "fedsa", "legend", "fedsb"])
def test_clients_trained_in_groups_end_as_trained_one_at_a_time(tmp_path, strategy, monkeypatch):
    groups, seconds = [], []

    def recorded(jobs):
        reports = train_together(jobs)
        groups.append(len(jobs))
        seconds.append(reports[0].seconds)
        return reports

    train_together = in_process.train_jobs_together
    monkeypatch.setattr(in_process, "train_jobs_together", recorded)
    grouped = run_grouped(tmp_path / "grouped", strategy, group_size=NODES)
    alone = run_grouped(tmp_path / "alone", strategy, group_size=1)

    # round 1 one group of 4; in round 2 FedEx-LoRA's and FFA-LoRA's bases differ by rank class
    # (two groups of 2); LEGEND's clients (ranks per layer) and Fed-SB's (its own layers) train
    # one at a time
    assert groups == GROUPS[strategy]
    if groups:  # the clients' training seconds: each group's steps once
        by_round = [seconds[:1], seconds[1:]]
        for row, group_seconds in zip(grouped, by_round, strict=True):
            assert row["train_busy_seconds"] == pytest.approx(sum(group_seconds), abs=1e-3)
    for row in alone:  # one client at a time: their training seconds add up
        assert row["train_seconds"] < row["train_busy_seconds"] < row["seconds"]
    for row, expected in zip(grouped, alone, strict=True):
        for key in ("train_loss", "loss", "client_loss", "client_accuracy"):
            if expected[key] is None:
                assert row[key] is None
            else:
                assert row[key] == pytest.approx(expected[key], rel=1e-4), (key, row, expected)
    if strategy == "fedsa":  # personalized: no global model
        return
    ours, theirs = (exported(tmp_path / name) for name in ("grouped", "alone"))
    assert ours.keys() == theirs.keys()
    for key, tensor in theirs.items():
        assert (ours[key] - tensor).norm() <= 1e-4 * max(tensor.norm(), 1e-6), key


def exported(run_dir) -> dict:
    """The tensors of the run's export (the merged model, or FFA-LoRA's adapter)."""
    (path,) = (run_dir / "export").glob("*.safetensors")
    return load_file(path)


def test_a_group_that_cannot_train_together_trains_one_at_a_time(monkeypatch):
    """A refused group trains its clients alone; a client whose training fails gets its error
    (its thread raises it: its node's error reply) and the others their reports."""
    monkeypatch.setattr(in_process, "same_base_groups", lambda models: [[0, 1, 2]])

    def refuse(jobs):
        raise ValueError("the clients' frozen bases differ")

    def breaks():
        raise RuntimeError("client 1 broke")

    monkeypatch.setattr(in_process, "train_jobs_together", refuse)
    report = TrainReport(loss=1.0, num_examples=2, seconds=0.1, started_at=0.0)
    slots = [GroupSlot(index) for index in range(3)]
    for slot, alone in zip(slots, [lambda: report, breaks, lambda: report], strict=True):
        slot.job = TrainingJob(None, [], 1, [0.1], 0, RunConfig(), alone)

    outcomes = in_process.train_parked(slots)
    assert outcomes[0] == outcomes[2] == (report, None)
    assert outcomes[1][0] is None and str(outcomes[1][1]) == "client 1 broke"
