"""``fedlora baselines`` at a tiny scale: the pretrained model, centralized LoRA on the pooled
clients' data with the federation's total steps, and local-only training, in this process."""

import csv
import json
import math

import pytest

from cli.main import main
from fedlora.config import RunConfig
from fedlora.data.partitioning import server_eval_set
from fedlora.models.base_model import load_base_model
from fedlora.training.local import evaluate
from simulations.baselines import RESULT_COLUMNS, spread, training_clients

COLOURS = ["red", "green", "blue", "black", "white"]


@pytest.fixture
def recipe(tmp_path):
    rows = [
        {"instruction": f"Say {COLOURS[i % 5]}.", "response": COLOURS[i % 5]} for i in range(40)
    ]
    data = tmp_path / "instructions.json"
    data.write_text(json.dumps(rows))
    path = tmp_path / "tiny-llm.toml"
    path.write_text(
        f"""[run]
model = "tiny-llama"
task = "causal-lm"
dataset = "json:{data}"
partitioner = "iid"
num-server-rounds = 2
local-steps = 2
batch-size = 4
max-length = 16
learning-rate = 0.05
rank-profile = "2:0.5,4:0.5"
server-eval-fraction = 0.2
max-new-tokens = 3
modules-to-save = "lm_head"

[simulation]
num-supernodes = 2
"""
    )
    return path


def test_baselines_command_writes_the_three_rows(recipe, tmp_path, one_thread, capsys):
    out = tmp_path / "out"
    assert main(["baselines", str(recipe), "--out", str(out)]) == 0
    assert "centralized" in capsys.readouterr().out
    with (out / "results.csv").open() as file:
        rows = {row["baseline"]: row for row in csv.DictReader(file)}
    assert list(rows) == ["pretrained", "centralized", "local-only"]
    assert list(rows["pretrained"]) == list(RESULT_COLUMNS)
    assert [int(rows[name]["steps"]) for name in rows] == [0, 2 * 2 * 2, 2 * 2]
    assert {row["generation_metric"] for row in rows.values()} == {"answer"}
    assert all(0 <= float(row["generation"]) <= 1 for row in rows.values())
    assert rows["pretrained"]["loss_std"] == "" and rows["local-only"]["loss_std"] != ""

    config = RunConfig(
        model="tiny-llama",
        task="causal-lm",
        dataset=f"json:{tmp_path / 'instructions.json'}",
        max_length=16,
        batch_size=4,
        server_eval_fraction=0.2,
        modules_to_save="lm_head",
    )
    base = load_base_model(config)
    pretrained = evaluate(base.model, server_eval_set(config), base.tokenizer, config, "cpu")
    assert math.isclose(float(rows["pretrained"]["loss"]), pretrained.loss, rel_tol=1e-6)
    losses = [float(rows[name]["loss"]) for name in ("centralized", "local-only", "pretrained")]
    assert losses == sorted(losses), losses  # twice the steps on all the data learn more


def test_training_clients_follow_fraction_and_minimum():
    assert training_clients(RunConfig(fraction_train=0.5, min_train_nodes=2), 10) == 5
    assert training_clients(RunConfig(fraction_train=0.1, min_train_nodes=2), 10) == 2
    assert training_clients(RunConfig(min_train_nodes=2), 1) == 1


def test_spread_is_the_mean_and_population_deviation_over_clients():
    row = spread(
        [
            {"accuracy": 0.2, "loss": 1.0, "generation": None},
            {"accuracy": 0.6, "loss": 3.0, "generation": None},
        ]
    )
    assert row == {
        "accuracy": pytest.approx(0.4),
        "accuracy_std": pytest.approx(0.2),
        "loss": 2.0,
        "loss_std": 1.0,
        "generation": None,
        "generation_std": None,
    }
