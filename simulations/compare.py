"""Every method on one recipe: identical partitions, ranks and seeds (only ``strategy`` changes),
each run in its own directory, then a results table and two plots."""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fedlora.errors import ConfigError
from fedlora.messages import Scalar
from simulations.plots import plot_accuracy_vs_bytes, plot_accuracy_vs_round
from simulations.recipes import Recipe, load_recipe, resolve
from simulations.run_dir import MetricsRow, read_metrics
from simulations.runner import SimulationError, simulate
from strategies import STRATEGIES

RESULTS_CSV = "results.csv"
ACCURACY_VS_ROUND = "accuracy_vs_round.png"
ACCURACY_VS_BYTES = "accuracy_vs_bytes.png"
RESULT_COLUMNS = (
    "strategy",
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
"""results.csv: accuracies over the rounds' rows, bytes and round seconds summed over rounds,
the whole run's wall time (Ray's start included), the worst relative deviation (empty: none),
the last generation scores (empty: none), why the run failed (empty: it did not)."""
GENERATION_COLUMNS = ("answer_accuracy", "rouge_l")

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
) -> list[dict]:
    """Run ``recipe`` once per strategy into ``out_dir/<strategy>``; write ``results.csv`` and
    the plots into ``out_dir``; return the results rows. ``overwrite`` lets each run replace an
    earlier run's directory (`simulations.runner.simulate`).

    Every strategy's configuration is checked before any run (a `ConfigError` names the first
    refused one). A run that fails (`simulations.runner.SimulationError`) does not stop the
    others: its row keeps the rounds it finished and says why in ``error``.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    resolved = {name: resolve(recipe, overrides, name, rounds) for name in strategies}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[MetricsRow]] = {}
    results = []
    for name in strategies:
        report = None if on_round is None else (lambda row, name=name: on_round(name, row))
        start = time.perf_counter()
        error = None
        try:
            simulate(resolved[name], out_dir=out_dir / name, on_round=report, overwrite=overwrite)
        except SimulationError as failure:
            error = str(failure)
        runs[name] = read_metrics(out_dir / name)
        results.append(summary(name, runs[name], time.perf_counter() - start, error))
    write_results_csv(out_dir / RESULTS_CSV, results)
    plot_accuracy_vs_round(runs, out_dir / ACCURACY_VS_ROUND, recipe.name)
    plot_accuracy_vs_bytes(runs, out_dir / ACCURACY_VS_BYTES, recipe.name)
    return results


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


def write_results_csv(path: Path, results: list[dict]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(results)
