"""Every method on one recipe: identical partitions, ranks and seeds (only ``strategy`` changes),
each run in its own directory, then a results table and two plots.

With several seeds each strategy runs once per seed on the same data: the k-th run's ``seed`` is
the recipe's seed + k and its ``data-seed`` the recipe's (the server's set, the partitions and
the clients' splits stay; the initial LoRA A and head, the batches and any DP noise vary). The
results give each strategy's mean and standard deviation (sample, over its seeds)."""

from __future__ import annotations

import csv
import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fedlora.errors import ConfigError
from fedlora.wire.messages import Scalar
from simulations.plots import plot_accuracy_vs_bytes, plot_accuracy_vs_round
from simulations.recipes import Recipe, load_recipe, resolve
from simulations.run_dir import MetricsRow, read_metrics
from simulations.runner import SimulationError, simulate
from simulations.shared_ray import shared_ray
from strategies import STRATEGIES

RESULTS_CSV = "results.csv"
SUMMARY_CSV = "summary.csv"
ACCURACY_VS_ROUND = "accuracy_vs_round.png"
ACCURACY_VS_BYTES = "accuracy_vs_bytes.png"
RESULT_COLUMNS = (
    "strategy",
    "seed",
    "rounds",
    "final_accuracy",
    "best_accuracy",
    "bytes_up",
    "bytes_down",
    "seconds",
    "wall_seconds",
    "max_relative_deviation",
    "answer_accuracy",
    "rouge_l",
    "error",
)
"""results.csv, a row per run: accuracies over the rounds' rows, bytes and round seconds summed
over rounds, the whole run's wall time (the first run's includes Ray's start: the runs share
one Ray instance, `simulations.shared_ray`), the worst relative deviation
(empty: none), the last generation scores (empty: none), why the run failed (empty: it did not)."""
GENERATION_COLUMNS = ("answer_accuracy", "rouge_l")
SPREAD_COLUMNS = (
    "final_accuracy",
    "best_accuracy",
    "max_relative_deviation",
    *GENERATION_COLUMNS,
    "bytes_up",
    "bytes_down",
    "seconds",
)
"""summary.csv, a row per strategy: ``runs``, ``failed``, and of each of these columns its
``_mean`` and ``_std`` over the strategy's runs that finished (std: sample, empty below two)."""

StrategyRowCallback = Callable[[str, MetricsRow], None]


def strategy_names(text: str) -> tuple[str, ...]:
    """'all' (every strategy, in registry order) or names separated by commas, checked."""
    if text.strip() == "all":
        return tuple(STRATEGIES)
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in STRATEGIES]
    if unknown or not names:
        raise ConfigError(
            f"unknown strategies {unknown or [text]}; choose 'all' or of {list(STRATEGIES)}"
        )
    return names


def compare(
    recipe: str | Path | Mapping | Recipe,
    strategies: Sequence[str],
    out_dir: str | Path,
    overrides: Mapping[str, Scalar] | Sequence[str] = (),
    rounds: int | None = None,
    on_round: StrategyRowCallback | None = None,
    overwrite: bool = False,
    seeds: int = 1,
) -> list[dict]:
    """Run ``recipe`` once per strategy into ``out_dir/<strategy>`` (``seeds`` times per strategy
    into ``out_dir/<strategy>/seed-<seed>``, on the same data); write ``results.csv``,
    ``summary.csv`` and the plots into ``out_dir``; return the results rows, a row per run.
    ``overwrite`` lets each run replace an earlier run's directory (`simulations.runner.simulate`).

    Every run's configuration is checked before any run (a `ConfigError` names the first refused
    one). A run that fails (`simulations.runner.SimulationError`) does not stop the others: its
    row keeps the rounds it finished and says why in ``error``.
    """
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    planned = {
        (name, seed): run
        for name in strategies
        for seed, run in seed_recipes(resolve(recipe, overrides, name, rounds), seeds).items()
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[list[MetricsRow]]] = {name: [] for name in strategies}
    results = []
    with shared_ray(recipe.simulation, len(planned)) as ray_address:
        for (name, seed), run in planned.items():
            report = None if on_round is None else (lambda row, name=name: on_round(name, row))
            run_dir = out_dir / name if seeds == 1 else out_dir / name / f"seed-{seed}"
            start = time.perf_counter()
            error = None
            try:
                simulate(
                    run,
                    out_dir=run_dir,
                    on_round=report,
                    overwrite=overwrite,
                    shared_ray=ray_address,
                )
            except SimulationError as failure:
                error = str(failure)
            rows = read_metrics(run_dir)
            runs[name].append(rows)
            elapsed = time.perf_counter() - start
            results.append({**summary(name, rows, elapsed, error), "seed": seed})
    write_csv(out_dir / RESULTS_CSV, RESULT_COLUMNS, results)
    write_csv(out_dir / SUMMARY_CSV, summary_columns(), strategy_spreads(results))
    plot_accuracy_vs_round(runs, out_dir / ACCURACY_VS_ROUND, recipe.name)
    plot_accuracy_vs_bytes(runs, out_dir / ACCURACY_VS_BYTES, recipe.name)
    return results


def seed_recipes(resolved: Recipe, seeds: int) -> dict[int, Recipe]:
    """{seed: recipe} of ``seeds`` runs of a resolved recipe: seeds s, s+1, ... from its own, all
    with its data seed."""
    config = resolved.run_config
    if seeds == 1:
        return {config.seed: resolved}
    return {
        config.seed + k: dataclasses.replace(
            resolved,
            run={**resolved.run, "seed": config.seed + k, "data-seed": config.partition_seed},
        )
        for k in range(seeds)
    }


def strategy_spreads(results: list[dict]) -> list[dict]:
    """A row per strategy (in the results' order): its runs, how many failed, and the mean and
    standard deviation of each `SPREAD_COLUMNS` column over its runs that did not fail."""
    rows = []
    for strategy in dict.fromkeys(result["strategy"] for result in results):
        own = [result for result in results if result["strategy"] == strategy]
        finished = [result for result in own if not result["error"]]
        row = {"strategy": strategy, "runs": len(own), "failed": len(own) - len(finished)}
        for column in SPREAD_COLUMNS:
            values = [result[column] for result in finished if result[column] is not None]
            row[f"{column}_mean"] = statistics.fmean(values) if values else None
            row[f"{column}_std"] = statistics.stdev(values) if len(values) > 1 else None
        rows.append(row)
    return rows


def summary_columns() -> tuple[str, ...]:
    spreads = (f"{column}_{kind}" for column in SPREAD_COLUMNS for kind in ("mean", "std"))
    return ("strategy", "runs", "failed", *spreads)


def summary(
    strategy: str, rows: list[MetricsRow], wall_seconds: float, error: str | None = None
) -> dict:
    """One results row from a run's metrics rows (and why the run failed, if it did)."""
    accuracies = [row["accuracy"] for row in rows if row.get("accuracy") is not None]
    deviations = [
        row["relative_deviation"] for row in rows if row.get("relative_deviation") is not None
    ]
    return {
        "strategy": strategy,
        "rounds": len(rows),
        "final_accuracy": rows[-1].get("accuracy") if rows else None,
        "best_accuracy": max(accuracies, default=None),
        "bytes_up": sum(row["bytes_up"] for row in rows),
        "bytes_down": sum(row["bytes_down"] for row in rows),
        "seconds": sum(row["seconds"] for row in rows),
        "wall_seconds": wall_seconds,
        "max_relative_deviation": max(deviations, default=None),
        **{column: last_value(rows, column) for column in GENERATION_COLUMNS},
        "error": error,
    }


def last_value(rows: list[MetricsRow], column: str) -> float | None:
    """The column's value in the last row where it is not null (None: no such row)."""
    values = [row[column] for row in rows if row.get(column) is not None]
    return values[-1] if values else None


def write_csv(path: Path, columns: Sequence[str], rows: list[dict]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, columns)
        writer.writeheader()
        writer.writerows(rows)
