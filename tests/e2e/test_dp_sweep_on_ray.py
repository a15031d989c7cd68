"""A tiny sweep of the CPU DP recipe (MiniLM on BBC News) through the ``fedlora dp-sweep`` command
on Ray."""

from __future__ import annotations

import csv

import pytest

from cli.main import main
from fedlora.privacy.sample_level import NOISE_TOLERANCE
from simulations.dp_sweep import (
    ACCURACY_VS_EPSILON,
    SWEEP_CSV,
)
from simulations.recipe_files import RECIPES_DIR

pytestmark = pytest.mark.slow


def test_tiny_dp_sweep_of_the_cpu_recipe(tmp_path, capsys):
    """Fed-SB on MiniLM at epsilon 3 and without DP, one round of two steps of 16 articles: the
    private run spends its whole budget (its federated start and that round) to Opacus'
    tolerance, the other none; the CSV and the plot are written."""
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
            "batch-size=16",
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
