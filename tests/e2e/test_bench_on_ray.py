"""``fedlora bench simulate``, ``fedlora bench gpus`` and ``fedlora bench train`` on Ray: the
plain loop trains like the simulation, the throughput run keeps its run directory (and, on a GPU,
the whole ``bench gpus`` command its setup), the training benchmark's figures come from its own
run."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from cli.main import main
from simulations.gpu_scaling import throughput
from simulations.recipe_files import RECIPES_DIR
from simulations.recipes import load_recipe, resolve
from simulations.run_dir import FLOWER_LOG, read_metrics
from strategies.run_record import read_manifest

pytestmark = pytest.mark.slow

TINY = RECIPES_DIR / "tiny.toml"
TINY_LLAMA = (
    "model=tiny-llama",
    "task=causal-lm",
    'modules-to-save=""',
    "target-modules=q_proj,v_proj",
)


def test_bench_simulate_splits_rounds_and_the_loop_trains_like_the_simulation(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "simulate",
                "--recipe",
                str(TINY),
                "--rounds",
                "2",
                "--json",
                str(out),
                "seed=3",
            ]
        )
        == 0
    )
    results = json.loads(out.read_text())
    assert results["setup"]["clients"] == 3 and results["setup"]["strategy"] == "fedex"
    assert results["setup"]["overrides"] == {"seed": 3} and results["setup"]["run"]["seed"] == 3
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_gpus_on_one_gpu_writes_its_run_and_its_setup(tmp_path):
    """The tiny recipe with two ClientApps on the GPU (num-gpus 0.5), on one GPU."""
    recipe = tmp_path / "tiny-gpu.toml"
    recipe.write_text(TINY.read_text().replace("num-gpus = 0.0", "num-gpus = 0.5"))
    out = tmp_path / "gpus.json"
    argv = ["bench", "gpus", "--recipe", str(recipe), "--gpus", "1", "--rounds", "2"]
    argv += ["--out", str(tmp_path / "runs"), "--json", str(out), "seed=2"]
    assert main(argv) == 0
    results = json.loads(out.read_text())
    assert results["setup"]["overrides"] == {"seed": 2} and results["setup"]["run"]["seed"] == 2
    (run,) = results["runs"]
    assert run["gpus"] == 1 and run["clients_at_once"] == 2 and run["steady_rounds"] == [2]
    assert run["scaling_efficiency"] == pytest.approx(1.0)
    run_dir = tmp_path / "runs" / "gpus-1"
    assert run["first_round_seconds"] == read_metrics(run_dir)[0]["seconds"]
    assert read_manifest(run_dir)["device"].startswith("cuda")


def test_bench_train_writes_the_figures_of_one_call(tmp_path, capsys):
    """The tiny Llama on the CPU: plain loop, grouped clients and the simulation from one call."""
    out = tmp_path / "train.json"
    argv = [
        "bench",
        "train",
        "--recipe",
        str(TINY),
        "--rounds",
        "2",
        "--steps",
        "2",
        "--warmup",
        "0",
        "--out",
        str(tmp_path / "run"),
        "--json",
        str(out),
    ]
    assert main([*argv, *TINY_LLAMA]) == 0
    results = json.loads(out.read_text())
    assert results["device"] == "cpu" and results["mfu"] is None
    assert results["setup"]["group"] == 3  # the recipe's 3 clients, fewer than the default 4
    assert (
        results["setup"]["overrides"]["model"] == results["setup"]["run"]["model"] == "tiny-llama"
    )
    rows = read_metrics(tmp_path / "run")
    later = rows[1]
    per_client = 2 * 8 * 32  # local steps x batch-size x max-length of tiny.toml
    exchange = later["client_seconds"] + later["communication_seconds"]
    assert results["federation_tokens_per_s"] == pytest.approx(3 * per_client / exchange)
    assert results["ratio"] == pytest.approx(
        results["federation_tokens_per_s"] / results["plain_tokens_per_s"]
    )
    assert later["train_seconds"] <= later["train_busy_seconds"] + 1e-3 <= exchange + 2e-3
    assert results["training_tokens_per_s"] == pytest.approx(
        3 * per_client / later["train_busy_seconds"]
    )
    assert results["first_round_seconds"] == rows[0]["seconds"]
    assert results["later_round_seconds"] == later["seconds"]
    assert results["plain"]["rows_per_step"] == 3 * 8 == results["grouped"]["rows_per_step"]
    assert results["grouped"]["ranks"] == [2, 4, 8]
    assert "grouped clients" in capsys.readouterr().out


def test_bench_scale_records_memory_and_seconds_every_round(tmp_path):
    """The scale recipe at a small size: 20 clients, 10 a round, 4 rounds."""
    out = tmp_path / "scale.json"
    argv = [
        "bench",
        "scale",
        "--clients",
        "20",
        "--rounds",
        "4",
        "--out",
        str(tmp_path / "run"),
        "--json",
        str(out),
        "seed=1",
    ]
    assert main(argv) == 0
    results = json.loads(out.read_text())
    assert results["setup"]["overrides"] == {"seed": 1}
    rows = results["rounds"]
    assert [row["round"] for row in rows] == [1, 2, 3, 4]
    metrics = read_metrics(tmp_path / "run")
    assert [row["seconds"] for row in rows] == [row["seconds"] for row in metrics]
    assert all(row["clients"] == 10 for row in metrics)
    assert rows[-1]["rss_mb"] <= rows[1]["rss_mb"] + 50
