"""``fedlora bench train``'s in-process loops on the tiny Llama, and its refusals (the run on Ray
is in ``tests/e2e/test_bench_on_ray.py``)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from cli.main import main
from fedlora.bench.train import grouped_throughput, mfu, plain_throughput
from fedlora.config import RunConfig
from fedlora.errors import ConfigError
from fedlora.models.base_model import load_base_model
from simulations.bench_train import default_group, train_benchmark
from simulations.recipe_files import RECIPES_DIR
from simulations.recipes import load_recipe, resolve

CONFIG = RunConfig.from_flower(
    {
        "model": "tiny-llama",
        "task": "causal-lm",
        "partitioner": "iid",
        "max-length": 16,
        "batch-size": 2,
        "rank-profile": "2:0.5,4:0.5",
    }
)
CPU = torch.device("cpu")


def test_plain_and_grouped_loops_count_the_positions_they_train(one_thread):
    base = load_base_model(CONFIG)
    plain = plain_throughput(base, CONFIG, CPU, 4, 4, steps=2, warmup=1)
    grouped = grouped_throughput(base, CONFIG, CPU, 2, 4, steps=2, warmup=1)
    for result in (plain, grouped):
        assert result["rows_per_step"] == 4 and result["mfu"] is None
        assert 2 * 4 * 2 < result["tokens"] <= 2 * 4 * 16  # 2 steps of 4 rows, up to 16 wide
        assert result["tokens_per_s"] == pytest.approx(result["tokens"] / result["seconds"])
    assert grouped["ranks"] == [2, 2]  # partitions 0 and 1 of 4: the profile's first half


def test_with_packing_both_loops_train_full_rows(one_thread):
    packed = dataclasses.replace(CONFIG, pack_sequences=True)
    base = load_base_model(packed)
    plain = plain_throughput(base, packed, CPU, 4, 4, steps=2, warmup=1)
    grouped = grouped_throughput(base, packed, CPU, 2, 4, steps=2, warmup=1)
    assert plain["tokens"] == grouped["tokens"] == 2 * 4 * 16  # 2 steps of 4 rows of 16 tokens


def test_mfu_counts_four_flops_per_parameter_and_token_on_known_gpus():
    assert mfu(10**9, 1e3, "cpu") is None
    assert mfu(10**9, 1e3, "NVIDIA H200") == pytest.approx(4e12 / 989e12)


def test_the_default_group_is_the_clients_that_train_together_in_the_recipe():
    """The in-process engine's group size, the ClientApps sharing a GPU on Ray, else 4."""
    grouped = load_recipe(RECIPES_DIR / "grouped-gpu.toml")
    assert default_group(grouped) == 8
    two = dataclasses.replace(grouped.simulation, group_size=2)
    assert default_group(dataclasses.replace(grouped, simulation=two)) == 2
    assert default_group(load_recipe(RECIPES_DIR / "multi-gpu.toml")) == 4  # num-gpus 0.25
    tiny = resolve(load_recipe(RECIPES_DIR / "tiny.toml"), ())
    assert default_group(tiny) == min(4, tiny.simulation.num_supernodes)


def test_a_group_past_the_clients_is_refused(tmp_path):
    base = load_base_model(CONFIG)
    with pytest.raises(ConfigError, match="a group of 5 clients, but the run has 4"):
        grouped_throughput(base, CONFIG, CPU, 5, 4, 1, 0)
    with pytest.raises(ConfigError, match="--group 4"):
        train_benchmark(RECIPES_DIR / "tiny.toml", group=4, out_dir=tmp_path / "run")


def test_bench_train_without_the_federation_writes_the_in_process_figures(tmp_path, capsys):
    out = tmp_path / "train.json"
    argv = ["bench", "train", "--recipe", str(RECIPES_DIR / "tiny.toml"), "--no-federation"]
    argv += ["--group", "2", "--steps", "1", "--warmup", "0", "--out", str(tmp_path / "run")]
    argv += ["--json", str(out), "model=tiny-llama", "task=causal-lm", 'modules-to-save=""']
    assert main(argv) == 0
    results = json.loads(out.read_text())
    assert results["grouped_ratio"] == pytest.approx(
        results["grouped_tokens_per_s"] / results["plain_tokens_per_s"]
    )
    assert results["grouped"]["ranks"] == [2, 4] and results["setup"]["group"] == 2
    assert "federation" not in results and "ratio" not in results
    assert not (tmp_path / "run").exists()
    printed = capsys.readouterr().out
    assert "grouped clients" in printed and "federation" not in printed
