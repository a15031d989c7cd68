"""``fedlora bench simulate`` and ``fedlora bench gpus`` on Ray: the plain loop trains like the
simulation, and the throughput run keeps its run directory."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cli.main import main
from simulations.gpu_scaling import throughput
from simulations.recipe_files import RECIPES_DIR
from simulations.recipes import load_recipe, resolve
from simulations.run_dir import FLOWER_LOG, read_metrics

pytestmark = pytest.mark.slow

TINY = RECIPES_DIR / "tiny.toml"


def test_bench_simulate_splits_rounds_and_the_loop_trains_like_the_simulation(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "simulate", str(TINY), "--rounds", "2", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["setup"]["clients"] == 3 and results["setup"]["strategy"] == "fedex"
    assert [row["round"] for row in results["rounds"]] == [1, 2]
    for row in results["rounds"]:
        assert row["simulation_client_accuracy"] == pytest.approx(
            row["plain_client_accuracy"], abs=1e-9
        )
        assert row["plain_seconds"] == pytest.approx(
            row["client_compute_seconds"] + row["aggregate_seconds"]
        )
        assert row["overhead_seconds"] == pytest.approx(
            row["simulation_seconds"] - row["plain_seconds"]
        )
    assert results["steady"]["rounds"] == [2]
    assert "overhead / compute" in capsys.readouterr().out


def test_gpu_throughput_keeps_its_run_directory_and_counts_the_rounds_after_the_first(tmp_path):
    """Ray is told of one GPU, which two ClientApps share (Ray does not check the device: on a
    CPU-only host they train on the CPU); the rate is over round 2 alone."""
    recipe = resolve(load_recipe(TINY), rounds=2)
    recipe = dataclasses.replace(
        recipe, simulation=dataclasses.replace(recipe.simulation, num_gpus=0.5)
    )
    result = throughput(recipe, 1, tmp_path / "gpus-1", None)
    rows = read_metrics(tmp_path / "gpus-1")
    assert (tmp_path / "gpus-1" / FLOWER_LOG).exists() and len(rows) == 2
    assert result["clients_at_once"] == 2 and result["steady_rounds"] == [2]
    assert result["client_rounds_per_minute"] == pytest.approx(
        60 * rows[1]["clients"] / rows[1]["seconds"]
    )
    assert result["first_round_seconds"] == rows[0]["seconds"]
