"""``fedlora bench gpus``: client-rounds per minute of one recipe on 1, 2, ... GPUs of one host.

The recipe runs once per GPU count in Flower's Ray simulation, Ray told to hand out only that many
GPUs (``[simulation] gpus``); the fractional ``num-gpus`` of the recipe decides how many ClientApps
share each. A client-round is one client's training and evaluation in one round; the rate is taken
over the rounds after the first (the first builds the model in every Ray worker). Scaling
efficiency is the rate per GPU relative to the first count's rate per GPU. Each run's directory
(metrics, Flower's log) is kept in ``OUT_DIR/gpus-N``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fedlora.errors import ConfigError
from simulations.recipes import Recipe, load_recipe, parse_overrides, resolve
from simulations.run_dir import read_metrics
from simulations.runner import simulate

GpuRunCallback = Callable[[int, int], None]
"""Called with (GPU count, round) as each round ends."""


def gpu_scaling_benchmark(
    recipe_path: str | Path,
    gpu_counts: Sequence[int],
    overrides=(),
    rounds: int | None = None,
    on_round: GpuRunCallback | None = None,
    out_dir: str | Path = "runs/bench-gpus",
) -> dict:
    """The recipe's throughput at each GPU count, and the scaling efficiency."""
    overrides = parse_overrides(overrides)
    recipe = resolve(load_recipe(recipe_path), overrides, rounds=rounds)
    available = torch.cuda.device_count()
    if not gpu_counts or min(gpu_counts) < 1 or max(gpu_counts) > available:
        raise ConfigError(f"--gpus {list(gpu_counts)}: this host has {available} GPU(s)")
    if recipe.simulation.num_gpus <= 0:
        raise ConfigError(f"recipe {recipe.name!r} gives its ClientApps no GPU (num-gpus = 0)")
    runs = [
        throughput(recipe, count, Path(out_dir) / f"gpus-{count}", on_round) for count in gpu_counts
    ]
    per_gpu = runs[0]["client_rounds_per_minute"] / runs[0]["gpus"]
    for run in runs:
        run["scaling_efficiency"] = run["client_rounds_per_minute"] / (per_gpu * run["gpus"])
    return {
        "setup": {
            "recipe": recipe.name,
            "overrides": overrides,
            "run": recipe.run,
            "simulation": recipe.simulation.table(),
            "device": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
        },
        "runs": runs,
    }


def throughput(recipe: Recipe, gpus: int, run_dir: Path, on_round: GpuRunCallback | None) -> dict:
    """One run on ``gpus`` GPUs into ``run_dir`` (replacing an earlier benchmark's run there):
    client-rounds per minute over the rounds after the first."""
    settings = dataclasses.replace(recipe.simulation, gpus=gpus)
    started = time.perf_counter()
    rows = read_metrics(
        simulate(
            dataclasses.replace(recipe, simulation=settings),
            out_dir=run_dir,
            on_round=(lambda row: on_round(gpus, row["round"])) if on_round else None,
            overwrite=True,
        )
    )
    wall = time.perf_counter() - started
    steady = rows[1:] or rows
    client_rounds = sum(row["clients"] for row in steady)
    seconds = sum(row["seconds"] for row in steady)
    return {
        "gpus": gpus,
        "clients_at_once": int(gpus / recipe.simulation.num_gpus),
        "client_rounds_per_minute": 60 * client_rounds / seconds,
        "steady_rounds": [row["round"] for row in steady],
        "steady_seconds": seconds,
        "first_round_seconds": rows[0]["seconds"],
        "wall_seconds": wall,
        "final_accuracy": rows[-1]["accuracy"],
    }
