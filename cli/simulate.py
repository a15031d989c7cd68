"""``fedlora demo``, ``simulate``, ``compare`` and ``dp-sweep``: runs of recipes in Flower's
simulation engine on Ray. Progress and a line per round go to stderr, the final table to stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from cli.options import (
    RECIPE_HELP,
    RUNS_DIR,
    add_out,
    add_overrides,
    add_overwrite,
    add_recipe,
    add_rounds,
    add_strategy,
    output_console,
)
from fedlora.errors import ConfigError
from simulations.compare import (
    ACCURACY_VS_BYTES,
    ACCURACY_VS_ROUND,
    GENERATION_COLUMNS,
    RESULTS_CSV,
    SUMMARY_CSV,
    compare,
    strategy_names,
    strategy_spreads,
)
from simulations.dp_sweep import (
    ACCURACY_VS_EPSILON,
    DEFAULT_STRATEGIES,
    SWEEP_CSV,
    dp_sweep,
    parse_epsilons,
)
from simulations.recipe_files import DEMO_RECIPE, recipe_file
from simulations.recipes import Recipe, load_recipe, resolve
from simulations.run_dir import (
    CONFIG_FILE,
    FLOWER_LOG,
    METRICS_CSV,
    METRICS_JSONL,
    MetricsRow,
    check_out_dir,
    read_metrics,
)
from simulations.runner import INTERRUPTED_HINT, resume, simulate
from strategies.run_record import MANIFEST_FILE, STATUS_FILE


def add_run_options(parser: argparse.ArgumentParser) -> None:
    add_out(parser, "the run directory")
    add_overwrite(parser)
    add_strategy(parser)
    add_rounds(parser)
    add_overrides(parser)
    parser.set_defaults(interrupted_hint=INTERRUPTED_HINT)


def add_demo(demo: argparse.ArgumentParser) -> None:
    demo.description = (
        f"Run the demo recipe ({DEMO_RECIPE.name}) in Flower's simulation engine on Ray: "
        "progress, accuracy per round, a final table; the run directory (default "
        "runs/demo) gets config.toml, status, manifest.json, metrics.jsonl, metrics.csv, "
        "flower.log, checkpoints and export/."
    )
    add_run_options(demo)
    demo.set_defaults(handler=run_recipe, recipe=DEMO_RECIPE)


def add_simulate(simulate_parser: argparse.ArgumentParser) -> None:
    simulate_parser.description = (
        "Run RECIPE (default run directory: runs/<recipe name>), or continue the run in "
        "--resume RUN_DIR from its last checkpoint (its config.toml is the recipe)."
    )
    simulate_parser.add_argument(
        "recipe", type=recipe_file, metavar="RECIPE", nargs="?", help=RECIPE_HELP
    )
    simulate_parser.add_argument(
        "--resume", type=Path, metavar="RUN_DIR", help="continue this run from its checkpoint"
    )
    add_run_options(simulate_parser)
    simulate_parser.set_defaults(handler=run_recipe)


def add_compare(compare_parser: argparse.ArgumentParser) -> None:
    compare_parser.description = (
        "Run RECIPE once per strategy with identical partitions, ranks and seeds, each into "
        "DIR/<strategy> (with --seeds N, N times per strategy on the same partitions into "
        "DIR/<strategy>/seed-<seed>: the seed varies the initial adapter, the batches and "
        f"DP noise); write DIR/{RESULTS_CSV} (a row per run), DIR/{SUMMARY_CSV} (mean and "
        f"standard deviation per strategy), DIR/{ACCURACY_VS_ROUND} and "
        f"DIR/{ACCURACY_VS_BYTES} (default DIR: runs/compare/<recipe name>)."
    )
    add_recipe(compare_parser)
    compare_parser.add_argument(
        "--strategies",
        default="all",
        metavar="all|NAME,NAME",
        help="'all' (default) or names separated by commas",
    )
    compare_parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="runs per strategy on the same data, seeds s..s+N-1 from the recipe's (default: 1)",
    )
    add_sweep_options(compare_parser)
    compare_parser.set_defaults(handler=run_compare)


def add_dp_sweep(sweep_parser: argparse.ArgumentParser) -> None:
    sweep_parser.description = (
        "Run RECIPE per strategy and budget (identical partitions, ranks and seeds) into "
        "DIR/<strategy>/eps-<budget>: a finite budget runs DP-SGD with dp-target-epsilon "
        f"set to it, inf runs without DP. Write DIR/{SWEEP_CSV} and "
        f"DIR/{ACCURACY_VS_EPSILON} (default DIR: runs/dp-sweep/<recipe name>)."
    )
    add_recipe(sweep_parser)
    sweep_parser.add_argument(
        "--epsilons", default="1,3,8,inf", metavar="E,E", help="budgets (default: 1,3,8,inf)"
    )
    sweep_parser.add_argument(
        "--strategies",
        default=DEFAULT_STRATEGIES,
        metavar="all|NAME,NAME",
        help=f"'all' or names separated by commas (default: {DEFAULT_STRATEGIES})",
    )
    add_sweep_options(sweep_parser)
    sweep_parser.set_defaults(handler=run_dp_sweep)


def add_sweep_options(parser: argparse.ArgumentParser) -> None:
    """What compare and dp-sweep share: the output directory, --overwrite, --rounds, overrides."""
    add_out(parser, "the output directory")
    add_overwrite(parser)
    add_rounds(parser)
    add_overrides(parser)
    parser.set_defaults(interrupted_hint=INTERRUPTED_HINT)


COMMANDS = {
    "demo": add_demo,
    "simulate": add_simulate,
    "compare": add_compare,
    "dp-sweep": add_dp_sweep,
}


# ---- demo, simulate -------------------------------------------------------------------------------


def run_recipe(args: argparse.Namespace) -> int:
    if getattr(args, "resume", None) is not None:
        given = [args.recipe, args.out, args.strategy, args.rounds, args.overrides, args.overwrite]
        if any(given):
            raise ConfigError(
                "--resume RUN_DIR continues with the run directory's config.toml: give no "
                "recipe, overrides, --out, --strategy, --rounds or --overwrite"
            )
        recipe, out_dir = load_recipe(args.resume / CONFIG_FILE), args.resume
    elif args.recipe is None:
        raise ConfigError("simulate needs RECIPE.toml, or --resume RUN_DIR")
    else:
        recipe = resolve(load_recipe(args.recipe), args.overrides, args.strategy, args.rounds)
        out_dir = args.out or RUNS_DIR / recipe.name
        check_out_dir(out_dir)
    rounds = recipe.run_config.num_server_rounds
    progress_console = Console(stderr=True)
    progress_console.print(f"{describe(recipe)}, strategy {recipe.run['strategy']}")
    start = time.perf_counter()
    with round_progress(progress_console) as progress:
        task = progress.add_task(f"{recipe.run['strategy']}: starting", total=rounds)

        def on_round(row: MetricsRow) -> None:
            progress.console.print(round_line(row))
            progress.update(task, completed=row["round"], description=f"round {row['round']}")

        if getattr(args, "resume", None) is not None:
            run_dir = resume(out_dir, on_round)
        else:
            run_dir = simulate(recipe, out_dir=out_dir, on_round=on_round, overwrite=args.overwrite)
    wall = time.perf_counter() - start
    console = output_console()
    console.print(rounds_table(recipe, read_metrics(run_dir)))
    names = (STATUS_FILE, MANIFEST_FILE, CONFIG_FILE, METRICS_JSONL, METRICS_CSV, FLOWER_LOG)
    files = ", ".join(names)
    console.print(f"wall time {wall:.0f} s; {run_dir}: {files}")
    return 0


def describe(recipe: Recipe) -> str:
    """The recipe's model, data, clients, ranks and rounds (not its strategy) in a line."""
    config = recipe.run_config
    ranks = config.rank_profile or f"all {config.lora_rank}"
    return (
        f"{recipe.name}: {config.model} on {config.dataset}, {recipe.simulation.num_supernodes} "
        f"clients ({config.partitioner}), ranks {ranks}, {config.num_server_rounds} rounds"
    )


def round_progress(console: Console) -> Progress:
    """A bar of rounds with the time elapsed and the time left (from the rounds done so far), on
    a terminal only: elsewhere only the lines printed through it appear."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )


def round_line(row: MetricsRow, strategy: str = "") -> str:
    prefix = f"{strategy} " if strategy else ""
    return (
        f"{prefix}round {row['round']}: accuracy {number(row.get('accuracy'), '.3f')}, "
        f"loss {number(row.get('loss'), '.3f')}, {row['seconds']:.1f} s"
    )


def rounds_table(recipe: Recipe, rows: list[MetricsRow]) -> Table:
    table = Table(title=f"{describe(recipe)}, strategy {recipe.run['strategy']}")
    generated = [c for c in GENERATION_COLUMNS if any(c in row for row in rows)]
    columns = ("round", "accuracy", "loss", *generated, "rel. deviation", "up", "down")
    for column in (*columns, "MB up, run", "MB down, run", "seconds"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row["round"]),
            number(row.get("accuracy"), ".3f"),
            number(row.get("loss"), ".3f"),
            *(number(row.get(column), ".3f") for column in generated),
            number(row.get("relative_deviation"), ".1e"),
            size(row["bytes_up"]),
            size(row["bytes_down"]),
            number(row.get("mb_up_total"), ".2f"),
            number(row.get("mb_down_total"), ".2f"),
            f"{row['seconds']:.1f}",
        )
    return table


# ---- compare --------------------------------------------------------------------------------------


def run_compare(args: argparse.Namespace) -> int:
    strategies = strategy_names(args.strategies)
    recipe = load_recipe(args.recipe)
    checked = resolve(recipe, args.overrides, strategies[0], args.rounds)
    out_dir = args.out or RUNS_DIR / "compare" / recipe.name
    check_out_dir(out_dir)
    rounds = checked.run_config.num_server_rounds
    progress_console = Console(stderr=True)
    seeds = f", {args.seeds} seeds each" if args.seeds > 1 else ""
    progress_console.print(f"{describe(checked)}, strategies {', '.join(strategies)}{seeds}")
    with round_progress(progress_console) as progress:
        task = progress.add_task("starting", total=rounds * len(strategies) * args.seeds)

        def on_round(strategy: str, row: MetricsRow) -> None:
            progress.console.print(round_line(row, strategy))
            progress.update(task, advance=1, description=f"{strategy} round {row['round']}")

        results = compare(
            recipe,
            strategies,
            out_dir,
            args.overrides,
            args.rounds,
            on_round,
            args.overwrite,
            args.seeds,
        )
    console = output_console()
    table = results_table if args.seeds == 1 else spread_table
    console.print(table(results, checked))
    files = f"{RESULTS_CSV}, {SUMMARY_CSV}, {ACCURACY_VS_ROUND}, {ACCURACY_VS_BYTES}"
    console.print(
        f"{out_dir}: {files}, a run directory per strategy"
        + (" and seed" if args.seeds > 1 else "")
    )
    failed = [result for result in results if result["error"]]
    for result in failed:
        print(f"fedlora: {result['strategy']} failed: {result['error']}", file=sys.stderr)
    return 1 if failed else 0


def run_dp_sweep(args: argparse.Namespace) -> int:
    strategies = strategy_names(args.strategies)
    epsilons = parse_epsilons(args.epsilons)
    recipe = load_recipe(args.recipe)
    checked = resolve(recipe, args.overrides, strategies[0], args.rounds)
    out_dir = args.out or RUNS_DIR / "dp-sweep" / recipe.name
    check_out_dir(out_dir)
    rounds = checked.run_config.num_server_rounds
    runs = [(s, e) for s in strategies for e in epsilons]
    progress_console = Console(stderr=True)
    budgets = ", ".join(f"{e:g}" for e in epsilons)
    progress_console.print(
        f"{describe(checked)}, strategies {', '.join(strategies)}, eps {budgets}"
    )
    with round_progress(progress_console) as progress:
        task = progress.add_task("starting", total=rounds * len(runs))

        def on_round(strategy: str, epsilon: float, row: MetricsRow) -> None:
            name = f"{strategy} eps {epsilon:g}"
            progress.console.print(round_line(row, name))
            done = runs.index((strategy, epsilon)) * rounds + row["round"]
            progress.update(task, completed=done, description=f"{name} round {row['round']}")

        results = dp_sweep(
            recipe,
            strategies,
            epsilons,
            out_dir,
            args.overrides,
            args.rounds,
            on_round,
            args.overwrite,
        )
    console = output_console()
    console.print(sweep_table(results, checked))
    console.print(f"{out_dir}: {SWEEP_CSV}, {ACCURACY_VS_EPSILON}, a run directory per run")
    return 0


def sweep_table(results: list[dict], recipe: Recipe) -> Table:
    table = Table(title=f"{describe(recipe)}; final accuracy by privacy budget")
    columns = ("strategy", "target eps", "final acc.", "drop", "eps spent", "stopped", "seconds")
    for column in columns:
        table.add_column(column, justify="right")
    for result in results:
        table.add_row(
            result["strategy"],
            f"{result['target_epsilon']:g}",
            number(result["final_accuracy"], ".3f"),
            number(result["accuracy_drop"], "+.3f"),
            number(result["epsilon_spent"], ".2f"),
            str(result["dp_stopped"]),
            f"{result['wall_seconds']:.0f}",
        )
    return table


def results_table(results: list[dict], recipe: Recipe) -> Table:
    table = Table(title=f"{describe(recipe)}; identical partitions, ranks and seeds")
    columns = ("strategy", "final acc.", "best acc.", "up", "down", "max rel. dev.", "seconds")
    for column in columns:
        table.add_column(column, justify="right")
    for result in results:
        table.add_row(
            result["strategy"],
            number(result["final_accuracy"], ".3f"),
            number(result["best_accuracy"], ".3f"),
            size(result["bytes_up"]),
            size(result["bytes_down"]),
            number(result["max_relative_deviation"], ".1e"),
            "failed" if result["error"] else f"{result['seconds']:.0f}",
        )
    return table


def spread_table(results: list[dict], recipe: Recipe) -> Table:
    """A row per strategy: mean ± standard deviation over its seeds' runs that finished."""
    table = Table(title=f"{describe(recipe)}; same partitions, mean ± std over seeds")
    columns = ("strategy", "runs", "final acc.", "best acc.", "up", "max rel. dev.", "seconds")
    for column in columns:
        table.add_column(column, justify="right")
    for row in strategy_spreads(results):
        failed = f" ({row['failed']} failed)" if row["failed"] else ""
        table.add_row(
            row["strategy"],
            f"{row['runs']}{failed}",
            mean_and_spread(row, "final_accuracy", ".3f"),
            mean_and_spread(row, "best_accuracy", ".3f"),
            "-" if row["bytes_up_mean"] is None else size(row["bytes_up_mean"]),
            mean_and_spread(row, "max_relative_deviation", ".1e"),
            number(row["seconds_mean"], ".0f"),
        )
    return table


def mean_and_spread(row: dict, column: str, spec: str) -> str:
    mean, std = row[f"{column}_mean"], row[f"{column}_std"]
    if mean is None:
        return "-"
    return format(mean, spec) + ("" if std is None else f" ± {format(std, spec)}")


# ---- formatting -----------------------------------------------------------------------------------


def number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def size(num_bytes: int) -> str:
    """Bytes in the largest binary unit that keeps the number at least 1."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"
