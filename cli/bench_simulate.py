"""The benchmarks that run simulations: ``fedlora bench simulate`` (a recipe's round time, client
compute vs framework overhead: `simulations.bench`) and ``fedlora bench gpus`` (client-rounds per
minute on 1, 2, ... GPUs: `simulations.gpu_scaling`)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.options import (
    add_json,
    add_out,
    add_overrides,
    add_recipe,
    add_rounds,
    comma_ints,
    output_console,
)
from simulations.bench import simulate_benchmark
from simulations.gpu_scaling import gpu_scaling_benchmark
from simulations.recipe_files import DEMO_RECIPE, RECIPES_DIR
from simulations.run_dir import check_out_dir

DEFAULT_ROUNDS = 3
MULTI_GPU_RECIPE = RECIPES_DIR / "multi-gpu.toml"


def add_simulate_benchmark(benchmarks: argparse._SubParsersAction) -> None:
    parser = benchmarks.add_parser(
        "simulate",
        help="a recipe's round time: client compute vs Flower/Ray overhead",
        description=(
            "Run a recipe (default: the demo's) one client at a time in Flower's Ray simulation and "
            "in a plain in-process loop doing the same training; per round, the loop's client "
            "compute, the simulation's overhead beyond it, and both runs' client accuracy."
        ),
    )
    add_recipe(parser, default=DEMO_RECIPE)
    add_rounds(parser, default=DEFAULT_ROUNDS)
    add_json(parser)
    add_overrides(parser)
    parser.set_defaults(handler=run_bench_simulate)


def run_bench_simulate(args: argparse.Namespace) -> int:
    results = with_spinner(
        lambda say: simulate_benchmark(
            args.recipe,
            args.overrides,
            args.rounds,
            lambda run, server_round: say(f"{run}: round {server_round} done"),
        )
    )
    output_console().print(results_table(results))
    write_json(args.json, results)
    return 0


def with_spinner(benchmark: Callable[[Callable[[str], None]], dict]) -> dict:
    """``benchmark(say)`` under a spinner on stderr; ``say`` rewrites the spinner's line."""
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    ) as progress:
        task = progress.add_task("starting", total=None)
        return benchmark(lambda text: progress.update(task, description=text))


def write_json(path: Path | None, results: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")


def results_table(results: dict) -> Table:
    setup = results["setup"]
    table = Table(
        title=(
            f"{setup['recipe']}: {setup['strategy']}, {setup['model']}, {setup['clients']} clients "
            f"one at a time, {setup['torch_threads']} torch thread(s), {setup['device']}"
        )
    )
    columns = (
        "round",
        "simulation",
        "plain loop",
        "client compute",
        "aggregation",
        "overhead",
        "overhead / compute",
        "accuracy (sim / loop)",
    )
    for column in columns:
        table.add_column(column, justify="right")
    steady = results["steady"]
    for row in [*results["rounds"], {**steady, "round": "steady"}]:
        accuracy = (
            f"{row['simulation_client_accuracy']:.4f} / {row['plain_client_accuracy']:.4f}"
            if "plain_client_accuracy" in row
            else ""
        )
        table.add_row(
            str(row["round"]),
            f"{row['simulation_seconds']:.2f} s",
            f"{row['plain_seconds']:.2f} s",
            f"{row['client_compute_seconds']:.2f} s",
            f"{row['aggregate_seconds'] * 1e3:.1f} ms" if "aggregate_seconds" in row else "",
            f"{row['overhead_seconds']:.2f} s",
            f"{row['overhead_fraction']:.1%}",
            accuracy,
        )
    return table


def add_gpus_benchmark(benchmarks: argparse._SubParsersAction) -> None:
    parser = benchmarks.add_parser(
        "gpus",
        help="client-rounds per minute of a recipe on 1, 2, ... GPUs",
        description=(
            "Run a recipe (default: multi-gpu.toml, a 0.4B Llama, 8 clients, 4 per GPU) once per "
            "GPU count in Flower's Ray simulation; client-rounds per minute after the first round "
            "and the scaling efficiency per GPU."
        ),
    )
    add_recipe(parser, default=MULTI_GPU_RECIPE)
    parser.add_argument(
        "--gpus", type=comma_ints, default=(1, 2), metavar="N,N", help="GPU counts (default 1,2)"
    )
    add_rounds(parser)
    add_json(parser)
    add_out(
        parser,
        "the runs' directories, DIR/gpus-N (default: runs/bench-gpus)",
        default=Path("runs/bench-gpus"),
    )
    add_overrides(parser)
    parser.set_defaults(handler=run_bench_gpus)


def run_bench_gpus(args: argparse.Namespace) -> int:
    check_out_dir(args.out)
    results = with_spinner(
        lambda say: gpu_scaling_benchmark(
            args.recipe,
            args.gpus,
            args.overrides,
            args.rounds,
            lambda gpus, server_round: say(f"{gpus} GPU(s): round {server_round} done"),
            args.out,
        )
    )
    table = Table(title=f"{results['setup']['recipe']} on {results['setup']['device']}")
    for column in ("GPUs", "clients at once", "client-rounds / min", "efficiency", "round 1"):
        table.add_column(column, justify="right")
    for run in results["runs"]:
        table.add_row(
            str(run["gpus"]),
            str(run["clients_at_once"]),
            f"{run['client_rounds_per_minute']:.1f}",
            f"{run['scaling_efficiency']:.0%}",
            f"{run['first_round_seconds']:.1f} s",
        )
    output_console().print(table)
    write_json(args.json, results)
    return 0
