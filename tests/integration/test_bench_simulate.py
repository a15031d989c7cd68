"""``fedlora bench simulate``: the plain loop does the same training as the simulation (equal client
accuracies every round), and the overhead is what the simulation takes beyond the loop;
``fedlora bench gpus``' checks and the ``[simulation] gpus`` key."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fedlora.errors import ConfigError
from simulations.bench import PLAIN_LOOP_STRATEGIES, plain_loop_rounds
from simulations.cli import main
from simulations.gpu_scaling import gpu_scaling_benchmark, throughput
from simulations.recipes import RECIPES_DIR, load_recipe, resolve
from simulations.run_dir import FLOWER_LOG, read_metrics

TINY = RECIPES_DIR / "tiny.toml"


def test_plain_loop_refuses_methods_with_node_state_before_anything_runs():
    for strategy in ("fedsa", "fedsb", "hetlora"):
        assert strategy not in PLAIN_LOOP_STRATEGIES
        with pytest.raises(ConfigError, match=strategy):
            plain_loop_rounds(resolve(load_recipe(TINY), strategy=strategy))


def test_plain_loop_rounds_report_compute_and_accuracy():
    rows = plain_loop_rounds(resolve(load_recipe(TINY), strategy="flora", rounds=2))
    assert len(rows) == 2
    for row in rows:
        assert row["client_seconds"] > 0 and row["aggregate_seconds"] > 0
        assert 0 <= row["client_accuracy"] <= 1


@pytest.mark.slow
def test_bench_simulate_splits_rounds_and_the_loop_trains_like_the_simulation(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert (
        main(["bench", "simulate", "--recipe", str(TINY), "--rounds", "2", "--json", str(out)]) == 0
    )
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


def test_gpu_scaling_refuses_more_gpus_than_the_host_has():
    with pytest.raises(ConfigError, match="GPU"):
        gpu_scaling_benchmark(RECIPES_DIR / "multi-gpu.toml", [torch.cuda.device_count() + 1])


@pytest.mark.slow
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


def test_simulation_gpus_limits_what_ray_hands_out():
    recipe = load_recipe(RECIPES_DIR / "multi-gpu.toml")
    assert "num_gpus" not in recipe.simulation.backend_config()["init_args"]
    limited = load_recipe({"simulation": {"num-gpus": 0.25, "gpus": 2}})
    assert limited.simulation.backend_config()["init_args"]["num_gpus"] == 2
    with pytest.raises(ConfigError, match="gpus"):
        load_recipe({"simulation": {"gpus": -1}})
