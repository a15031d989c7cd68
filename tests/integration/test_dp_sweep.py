"""The DP sweep: budgets parsed and turned into run keys, and a tiny sweep of the CPU recipe
(MiniLM on BBC News) through the ``fedlora dp-sweep`` command (marked slow)."""

from __future__ import annotations

import csv
import math

import pytest

from fedlora.errors import ConfigError
from fedlora.privacy import NOISE_TOLERANCE
from simulations.cli import main
from simulations.dp_sweep import (
    ACCURACY_VS_EPSILON,
    SWEEP_CSV,
    budget_name,
    budget_overrides,
    parse_epsilons,
    with_accuracy_drop,
)
from simulations.recipes import RECIPES_DIR, load_recipe, resolve


def test_budgets_parse_in_order_and_inf_means_no_dp():
    assert parse_epsilons("1, 3,8,inf") == (1.0, 3.0, 8.0, math.inf)
    assert budget_overrides(math.inf) == {"dp-sample": False}
    assert budget_overrides(3.0) == {"dp-sample": True, "dp-target-epsilon": 3.0}
    assert [budget_name(e) for e in (0.5, 3.0, math.inf)] == ["eps-0.5", "eps-3", "eps-inf"]


@pytest.mark.parametrize("text", ["0,1", "1,x", "3,3", "-1", ""])
def test_bad_budgets_are_refused_naming_the_option(text):
    with pytest.raises(ConfigError, match="--epsilons"):
        parse_epsilons(text)


def test_accuracy_drop_is_measured_from_the_non_private_run():
    runs = [
        {"target_epsilon": 1.0, "final_accuracy": 0.5},
        {"target_epsilon": math.inf, "final_accuracy": 0.9},
    ]
    assert [r["accuracy_drop"] for r in with_accuracy_drop(runs)] == pytest.approx([0.4, 0.0])
    alone = with_accuracy_drop([{"target_epsilon": 1.0, "final_accuracy": 0.5}])
    assert alone[0]["accuracy_drop"] is None


def test_dp_recipes_resolve_with_dp_on():
    for name in ("dp-sample", "dp-sample-gpu"):
        config = resolve(load_recipe(RECIPES_DIR / f"{name}.toml")).run_config
        assert config.dp_sample and config.model == "minilm" and config.dataset == "bbcnews"


@pytest.mark.slow
def test_tiny_dp_sweep_of_the_cpu_recipe(tmp_path, capsys):
    """Fed-SB on MiniLM at epsilon 3 and without DP, one round of two steps: the private run
    spends its whole budget (its federated start and that round) to Opacus' tolerance, the other
    none; the CSV and the plot are written."""
    out = tmp_path / "sweep"
    status = main(
        [
            "dp-sweep",
            str(RECIPES_DIR / "dp-sample.toml"),
            "--strategies",
            "fedsb",
            "--epsilons",
            "3,inf",
            "--rounds",
            "1",
            "--out",
            str(out),
            "local-steps=2",
            "max-length=32",
        ]
    )
    assert status == 0
    with (out / SWEEP_CSV).open() as file:
        rows = list(csv.DictReader(file))
    assert [(r["strategy"], r["target_epsilon"]) for r in rows] == [
        ("fedsb", "3.0"),
        ("fedsb", "inf"),
    ]
    for row in rows:
        assert 0 < float(row["final_accuracy"]) <= 1
        if row["target_epsilon"] == "inf":
            assert row["epsilon_spent"] == "" and float(row["accuracy_drop"]) == 0
        else:
            assert 3 - NOISE_TOLERANCE <= float(row["epsilon_spent"]) <= 3
    assert (out / ACCURACY_VS_EPSILON).read_bytes().startswith(b"\x89PNG")
    assert (out / "fedsb" / "eps-3" / "metrics.jsonl").exists()
    assert f"{SWEEP_CSV}, {ACCURACY_VS_EPSILON}" in capsys.readouterr().out
