"""The DP sweep: each strategy at each privacy budget on one recipe (identical partitions, ranks
and seeds; only ``strategy`` and the budget change), each run in its own directory, then a
results table and a plot of final accuracy against epsilon.

A finite budget eps runs with ``dp-sample = true`` and ``dp-target-epsilon = eps``: every client's
noise is set so that the whole run spends at most eps (`fedlora.privacy`); ``inf`` runs without
DP. The budget's keys override the recipe's and the command line's.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fedlora.errors import ConfigError
from fedlora.wire.messages import Scalar
from simulations.compare import summary
from simulations.plots import finish, new_figure
from simulations.recipes import Recipe, load_recipe, parse_overrides
from simulations.run_dir import MetricsRow, read_metrics
from simulations.runner import simulate
from simulations.shared_ray import shared_ray

SWEEP_CSV = "dp_results.csv"
ACCURACY_VS_EPSILON = "accuracy_vs_epsilon.png"
DEFAULT_STRATEGIES = "fedavg,fedex,fedsa,fedsb,ffalora"
SWEEP_COLUMNS = (
    "strategy",
    "target_epsilon",
    "final_accuracy",
    "best_accuracy",
    "accuracy_drop",
    "epsilon_spent",
    "dp_stopped",
    "bytes_up",
    "seconds",
    "wall_seconds",
)
"""dp_results.csv: one row per (strategy, budget); accuracy_drop is the non-private run's final
accuracy less this one's (empty without an ``inf`` run); epsilon_spent the largest epsilon any
client reported (empty without DP); dp_stopped the client replies refused by ``max-epsilon``."""
INFINITY_GAP = 2.0
"""The plot draws the non-private runs at this factor beyond the largest finite budget."""

BudgetRowCallback = Callable[[str, float, MetricsRow], None]


def parse_epsilons(text: str) -> tuple[float, ...]:
    """'1,3,8,inf' as budgets: positive numbers or inf, each once, in the order given."""
    epsilons = []
    for part in (part.strip() for part in text.split(",")):
        try:
            epsilon = float(part)
        except ValueError:
            raise ConfigError(f"--epsilons {text!r}: {part!r} is not a number or inf") from None
        if not epsilon > 0 or epsilon in epsilons:
            raise ConfigError(f"--epsilons {text!r}: budgets must be > 0 and distinct")
        epsilons.append(epsilon)
    return tuple(epsilons)


def budget_overrides(epsilon: float) -> dict[str, Scalar]:
    """The run keys of a budget: no DP for inf, else DP-SGD with that target epsilon."""
    if math.isinf(epsilon):
        return {"dp-sample": False}
    return {"dp-sample": True, "dp-target-epsilon": epsilon}


def budget_name(epsilon: float) -> str:
    """The run directory of a budget: ``eps-inf``, ``eps-3``, ``eps-0.5``."""
    return f"eps-{epsilon:g}"


def dp_sweep(
    recipe: str | Path | Mapping | Recipe,
    strategies: Sequence[str],
    epsilons: Sequence[float],
    out_dir: str | Path,
    overrides: Mapping[str, Scalar] | Sequence[str] = (),
    rounds: int | None = None,
    on_round: BudgetRowCallback | None = None,
    overwrite: bool = False,
) -> list[dict]:
    """Run ``recipe`` per strategy and budget into ``out_dir/<strategy>/eps-<budget>``; write
    ``dp_results.csv`` and the plot into ``out_dir``; return the results rows. A failed run raises
    at once (`simulations.runner.SimulationError`). ``overwrite`` lets each run replace an
    earlier run's directory."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    overrides = parse_overrides(overrides)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    with shared_ray(recipe.simulation, len(strategies) * len(epsilons)) as ray_address:
        for strategy in strategies:
            runs = []
            for epsilon in epsilons:
                report = (
                    None
                    if on_round is None
                    else (lambda row, s=strategy, e=epsilon: on_round(s, e, row))
                )
                start = time.perf_counter()
                run_dir = simulate(
                    recipe,
                    {**overrides, **budget_overrides(epsilon)},
                    out_dir / strategy / budget_name(epsilon),
                    strategy,
                    rounds,
                    report,
                    overwrite,
                    shared_ray=ray_address,
                )
                rows = read_metrics(run_dir)
                elapsed = time.perf_counter() - start
                runs.append(budget_result(strategy, epsilon, rows, elapsed))
            results.extend(with_accuracy_drop(runs))
    write_sweep_csv(out_dir / SWEEP_CSV, results)
    plot_accuracy_vs_epsilon(results, out_dir / ACCURACY_VS_EPSILON, recipe.name)
    return results


def budget_result(
    strategy: str, epsilon: float, rows: list[MetricsRow], wall_seconds: float
) -> dict:
    """One results row: `simulations.compare.summary`'s, with the budget and what was spent."""
    run = summary(strategy, rows, wall_seconds)
    spent = [row["epsilon_max"] for row in rows if row.get("epsilon_max") is not None]
    return {
        **{key: run[key] for key in SWEEP_COLUMNS if key in run},
        "target_epsilon": epsilon,
        "epsilon_spent": max(spent, default=None),
        "dp_stopped": sum(row.get("dp_stopped", 0) for row in rows),
    }


def with_accuracy_drop(runs: list[dict]) -> list[dict]:
    """The strategy's rows with the non-private final accuracy less each one's."""
    plain = [r["final_accuracy"] for r in runs if math.isinf(r["target_epsilon"])]
    for run in runs:
        known = plain and plain[0] is not None and run["final_accuracy"] is not None
        run["accuracy_drop"] = plain[0] - run["final_accuracy"] if known else None
    return runs


def write_sweep_csv(path: Path, results: list[dict]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, SWEEP_COLUMNS)
        writer.writeheader()
        writer.writerows(results)


def plot_accuracy_vs_epsilon(results: list[dict], path: Path, title: str) -> None:
    """Final accuracy against the budget (log scale), one line per strategy; the non-private
    runs are drawn right of the largest finite budget, at the tick "no DP"."""
    finite = sorted({r["target_epsilon"] for r in results if math.isfinite(r["target_epsilon"])})
    no_dp = INFINITY_GAP * finite[-1] if finite else 1.0
    figure, axes = new_figure()
    for strategy in dict.fromkeys(r["strategy"] for r in results):
        points = [
            (r["target_epsilon"] if math.isfinite(r["target_epsilon"]) else no_dp, accuracy)
            for r in results
            if r["strategy"] == strategy and (accuracy := r["final_accuracy"]) is not None
        ]
        if points:
            axes.plot(*zip(*sorted(points), strict=True), marker="o", label=strategy)
    axes.set_xscale("log")
    ticks = finite + ([no_dp] if any(math.isinf(r["target_epsilon"]) for r in results) else [])
    axes.set_xticks(ticks, [f"{t:g}" for t in finite] + ["no DP"] * (len(ticks) - len(finite)))
    axes.minorticks_off()
    axes.set_xlabel("target epsilon (whole run, per client; log scale)")
    finish(figure, axes, path, f"{title}: final accuracy vs privacy budget")
