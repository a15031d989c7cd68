"""``fedlora bench demo``: the demo's wall time as a user runs it against a plain FedAvg loop.

Two runs of the recipe (default: the demo's) in one process, each timed whole, start-up included:

1. the recipe as ``fedlora simulate`` runs it: its method, Flower's simulation engine with its own
   ``[simulation]`` settings (the demo: two ClientApps at once on Ray), the server's evaluation,
   checkpoints and the export;
2. a plain FedAvg loop over the same model, data, clients and rounds, in this process with torch's
   threads on every core and no Flower (`simulations.bench.PlainLoop`: each client trains its local
   steps on the same seeded batches, FedAvg averages, each client evaluates).

Both runs take the recipe's precision (``cpu_bf16_autocast``: whether its ``cpu-autocast`` puts the
CPU's forward passes under bf16 autocast here). ``ratio`` = simulation seconds / plain seconds:
what running the federation through fedlora costs against the loop a researcher would write by
hand. Two runs of one machine can differ by a tenth and more, so ``repeats`` runs the pair that
many times, one pair after the other: the figures are then those of the pair whose ratio is the
median (of an even number, the lower of the middle two), and ``pairs`` holds every pair's.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from fedlora.errors import ConfigError
from fedlora.training.local import cpu_autocast
from simulations.bench import RoundCallback, plain_loop_rounds
from simulations.recipes import Recipe, load_recipe, parse_overrides, resolve
from simulations.run_dir import read_metrics
from simulations.runner import simulate

BASELINE = "fedavg"


def demo_benchmark(
    recipe_path: str | Path,
    overrides=(),
    rounds: int | None = None,
    on_round: RoundCallback | None = None,
    repeats: int = 1,
) -> dict:
    """Both runs' wall seconds, their ratio and the clients' accuracy of the last round; with
    ``repeats`` pairs, the median pair's figures, every pair's in ``pairs``; the setup names the
    run-config ``overrides`` applied to both runs."""
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    overrides = parse_overrides(overrides)
    recipe = resolve(load_recipe(recipe_path), overrides, rounds=rounds)
    cores = os.cpu_count() or 1
    plain_recipe = resolve(recipe, {"num-threads": cores}, strategy=BASELINE)
    pairs = []
    for pair in range(1, repeats + 1):
        label = f" {pair}/{repeats}" if repeats > 1 else ""
        pairs.append(timed_pair(recipe, plain_recipe, labelled(on_round, label)))
    median = sorted(pairs, key=lambda figures: figures["ratio"])[(repeats - 1) // 2]
    config, settings = recipe.run_config, recipe.simulation
    return {
        "setup": {
            "recipe": recipe.name,
            "overrides": overrides,
            "strategy": config.strategy,
            "baseline": BASELINE,
            "model": config.model,
            "clients": settings.num_supernodes,
            "rounds": config.num_server_rounds,
            "engine": settings.engine,
            "cpus_per_client_app": settings.num_cpus,
            "baseline_torch_threads": cores,
            "cores": cores,
            "cpu_bf16_autocast": cpu_autocast(config),
            "torch": torch.__version__,
            "repeats": repeats,
        },
        **median,
        "pairs": pairs,
    }


def timed_pair(recipe: Recipe, plain_recipe: Recipe, on_round: RoundCallback | None) -> dict:
    """The plain loop, then the recipe as ``fedlora simulate`` runs it, each timed whole."""
    start = time.perf_counter()
    plain = plain_loop_rounds(plain_recipe, on_round)
    plain_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="fedlora-bench-") as out_dir:
        start = time.perf_counter()
        run_dir = simulate(
            recipe,
            out_dir=out_dir,
            on_round=(lambda row: on_round("simulation", row["round"])) if on_round else None,
        )
        simulation_seconds = time.perf_counter() - start
        simulated = read_metrics(run_dir)
    return {
        "simulation_seconds": simulation_seconds,
        "plain_seconds": plain_seconds,
        "ratio": simulation_seconds / plain_seconds,
        "simulation_round_seconds": [row["seconds"] for row in simulated],
        "plain_round_seconds": [row["client_seconds"] + row["aggregate_seconds"] for row in plain],
        "simulation_client_accuracy": simulated[-1]["client_accuracy"],
        "plain_client_accuracy": plain[-1]["client_accuracy"],
    }


def labelled(on_round: RoundCallback | None, label: str) -> RoundCallback | None:
    """``on_round`` with ``label`` after each run's name."""
    if on_round is None or not label:
        return on_round
    return lambda run, server_round: on_round(run + label, server_round)
