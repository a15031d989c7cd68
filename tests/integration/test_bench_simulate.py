"""``fedlora bench simulate``'s plain loop (its refusals, its rounds' figures), ``fedlora bench
gpus``' checks and the ``[simulation] gpus`` key (the runs on Ray are in
``tests/e2e/test_bench_on_ray.py``)."""

from __future__ import annotations

import json

import pytest
import torch

from cli.main import main
from fedlora.errors import ConfigError
from fedlora.rules import RULES
from simulations.bench import plain_loop_rounds, runs_in_plain_loop
from simulations.bench_demo import demo_benchmark
from simulations.gpu_scaling import gpu_scaling_benchmark
from simulations.recipe_files import RECIPES_DIR
from simulations.recipes import load_recipe, resolve

TINY = RECIPES_DIR / "tiny.toml"


def test_plain_loop_refuses_methods_with_node_state_before_anything_runs():
    plain = {name for name, rule in RULES.items() if runs_in_plain_loop(rule)}
    assert plain == {"fedavg", "fedex", "flora", "lorafair", "flexlora", "fslora", "legend"}
    for strategy in ("fedsa", "fedsb", "hetlora", "ffalora"):
        with pytest.raises(ConfigError, match=strategy):
            plain_loop_rounds(resolve(load_recipe(TINY), strategy=strategy))


@pytest.mark.parametrize("strategy", ["flora", "fslora", "legend"])
def test_plain_loop_rounds_report_compute_and_accuracy(strategy):
    rows = plain_loop_rounds(resolve(load_recipe(TINY), strategy=strategy, rounds=2))
    assert len(rows) == 2
    for row in rows:
        assert row["client_seconds"] > 0 and row["aggregate_seconds"] > 0
        assert 0 <= row["client_accuracy"] <= 1


def test_gpu_scaling_refuses_more_gpus_than_the_host_has():
    with pytest.raises(ConfigError, match="GPU"):
        gpu_scaling_benchmark(RECIPES_DIR / "multi-gpu.toml", [torch.cuda.device_count() + 1])


def test_simulation_gpus_limits_what_ray_hands_out():
    recipe = load_recipe(RECIPES_DIR / "multi-gpu.toml")
    assert "num_gpus" not in recipe.simulation.backend_config()["init_args"]
    limited = load_recipe({"simulation": {"num-gpus": 0.25, "gpus": 2}})
    assert limited.simulation.backend_config()["init_args"]["num_gpus"] == 2
    with pytest.raises(ConfigError, match="gpus"):
        load_recipe({"simulation": {"gpus": -1}})


@pytest.fixture
def tiny_in_process(tmp_path):
    """The tiny recipe on the in-process engine."""
    path = tmp_path / "tiny-in-process.toml"
    path.write_text(TINY.read_text() + '\nengine = "in-process"\n')
    return path


def test_bench_demo_times_the_recipe_and_a_plain_fedavg_loop(tiny_in_process):
    """The tiny recipe on the in-process engine: both runs' seconds, the ratio of the two, their
    rounds and the clients' accuracy; the baseline is FedAvg on every core whatever the recipe's
    method."""
    results = demo_benchmark(tiny_in_process, ["strategy=fedex"], rounds=2)
    setup = results["setup"]
    assert (setup["strategy"], setup["baseline"], setup["engine"]) == (
        "fedex",
        "fedavg",
        "in-process",
    )
    assert setup["baseline_torch_threads"] == setup["cores"]
    assert setup["cpu_bf16_autocast"] is False  # the tiny recipe's float32
    assert setup["overrides"] == {"strategy": "fedex"}
    assert results["ratio"] == pytest.approx(
        results["simulation_seconds"] / results["plain_seconds"]
    )
    assert len(results["simulation_round_seconds"]) == len(results["plain_round_seconds"]) == 2
    assert sum(results["plain_round_seconds"]) <= results["plain_seconds"]
    assert sum(results["simulation_round_seconds"]) <= results["simulation_seconds"]
    for key in ("simulation_client_accuracy", "plain_client_accuracy"):
        assert 0 <= results[key] <= 1
    assert results["pairs"] == [{k: v for k, v in results.items() if k not in ("setup", "pairs")}]


def test_bench_demo_repeats_the_pair_and_reports_the_median_one(tiny_in_process):
    """Three pairs, one after the other: the figures are those of the pair of median ratio; each
    round's callback names its pair."""
    named = set()
    results = demo_benchmark(
        tiny_in_process, rounds=1, on_round=lambda run, _: named.add(run), repeats=3
    )
    ratios = sorted(pair["ratio"] for pair in results["pairs"])
    assert results["setup"]["repeats"] == len(results["pairs"]) == 3
    assert results["ratio"] == ratios[1]
    assert results["simulation_seconds"] / results["plain_seconds"] == pytest.approx(ratios[1])
    assert {"plain loop 1/3", "simulation 3/3"} <= named
    with pytest.raises(ConfigError, match="repeats must be >= 1, got 0"):
        demo_benchmark(tiny_in_process, rounds=1, repeats=0)


def test_bench_demo_command_repeats_the_pair(tiny_in_process, tmp_path, capsys):
    out = tmp_path / "demo.json"
    command = [
        "bench",
        "demo",
        "--recipe",
        str(tiny_in_process),
        "--rounds",
        "1",
        "--json",
        str(out),
    ]
    assert main([*command, "--repeats", "2"]) == 0
    assert len(json.loads(out.read_text())["pairs"]) == 2
    assert "the 2 pairs' ratios" in capsys.readouterr().out
    assert main([*command, "--repeats", "0"]) == 2
    assert "repeats must be >= 1, got 0" in capsys.readouterr().err
