"""A 2-round federation in this process (the real ServerApp and ClientApp on `LocalGrid`) with
evaluation by generation in round 2, on the server and the clients, and a communication budget
passed in round 1."""

import json
import logging
import math

import pytest

from clients.app import client_app
from fedlora.models.generation import answer_correct
from strategies.server_app import MB, run
from tests.support.local_grid import LocalGrid

COLOURS = ["red", "green", "blue", "black", "white"]


@pytest.fixture
def instructions_spec(tmp_path):
    rows = [
        {"instruction": f"Say {COLOURS[i % 5]}.", "response": COLOURS[i % 5]} for i in range(40)
    ]
    path = tmp_path / "instructions.json"
    path.write_text(json.dumps(rows))
    return f"json:{path}"


def test_generation_rounds_write_samples_scores_and_running_totals(
    instructions_spec, tmp_path, task_identity, one_thread, caplog
):
    config = {
        "strategy": "fedex",
        "model": "tiny-llama",
        "task": "causal-lm",
        "dataset": instructions_spec,
        "partitioner": "iid",
        "num-server-rounds": 2,
        "max-length": 16,
        "batch-size": 4,
        "local-steps": 1,
        "server-eval-fraction": 0.15,
        "generation-every": 2,
        "client-generation": True,
        "max-new-tokens": 3,
        "communication-budget-mb": 0.001,
    }
    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="strategies.server_app"):
        run(LocalGrid(client_app(config), num_nodes=2), {**config, "run-dir": str(run_dir)})
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    assert rows[0]["answer_accuracy"] is None and rows[0]["eval_loss"] is None
    assert rows[0]["client_answer_accuracy"] is None
    assert 0 <= rows[1]["client_answer_accuracy"] <= 1
    assert "rouge_l" not in rows[1] and rows[1]["eval_loss"] == rows[1]["loss"]
    assert [path.name for path in (run_dir / "samples").iterdir()] == ["round-2.jsonl"]
    samples = [
        json.loads(line)
        for line in (run_dir / "samples" / "round-2.jsonl").read_text().splitlines()
    ]
    assert len(samples) == 6 and set(samples[0]) == {"prompt", "reference", "generation"}
    assert all(s["prompt"] == f"Say {s['reference']}." for s in samples)
    assert all(len(s["generation"].split()) <= 3 for s in samples)
    hits = sum(answer_correct(s["generation"], s["reference"]) for s in samples)
    assert rows[1]["answer_accuracy"] == hits / len(samples)

    up = down = 0.0
    for row in rows:
        up, down = up + row["bytes_up"] / MB, down + row["bytes_down"] / MB
        assert math.isclose(row["mb_up_total"], up) and math.isclose(row["mb_down_total"], down)
    assert rows[0]["mb_up_total"] + rows[0]["mb_down_total"] > 0.001
    warnings = [r.getMessage() for r in caplog.records if "communication budget" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("round 1:")
