"""The benchmarks that run simulations: ``fedlora bench simulate`` (a recipe's round time, client
compute vs framework overhead: `simulations.bench`), ``fedlora bench gpus`` (client-rounds per
minute on 1, 2, ... GPUs: `simulations.gpu_scaling`), ``fedlora bench train`` (the clients'
training rate against the plain loop: `simulations.bench_train`) and ``fedlora bench scale``
(memory and seconds per round of many clients: `simulations.bench_scale`)."""

from __future__ import annotations

import argparse
import functools
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
    add_recipe_option,
    add_rounds,
    comma_ints,
    output_console,
)
from simulations.bench import simulate_benchmark
from simulations.bench_demo import demo_benchmark
from simulations.bench_scale import SCALE_RECIPE, scale_benchmark
from simulations.bench_train import TIMED_STEPS, train_benchmark
from simulations.gpu_scaling import gpu_scaling_benchmark
from simulations.recipe_files import DEMO_RECIPE, RECIPES_DIR
from simulations.run_dir import check_out_dir

DEFAULT_ROUNDS = 3
MULTI_GPU_RECIPE = RECIPES_DIR / "multi-gpu.toml"


def add_recipe_benchmark(
    benchmarks: argparse._SubParsersAction,
    name: str,
    help_text: str,
    description: str,
    rounds: int | None,
    handler: Callable[[argparse.Namespace], int],
) -> argparse.ArgumentParser:
    """A benchmark of one recipe (default: the demo's): its rounds, JSON file and overrides."""
    parser = benchmarks.add_parser(name, help=help_text, description=description)
    add_recipe_option(parser, default=DEMO_RECIPE)
    add_rounds(parser, default=rounds)
    add_json(parser)
    add_overrides(parser)
    parser.set_defaults(handler=handler)
    return parser


def add_simulate_benchmark(benchmarks: argparse._SubParsersAction) -> None:
    add_recipe_benchmark(
        benchmarks,
        "simulate",
        "a recipe's round time: client compute vs Flower/Ray overhead",
        "Run a recipe (default: the demo's) one client at a time in Flower's Ray simulation and "
        "in a plain in-process loop doing the same training; per round, the loop's client "
        "compute, the simulation's overhead beyond it, and both runs' client accuracy.",
        DEFAULT_ROUNDS,
        run_bench_simulate,
    )


def run_bench_simulate(args: argparse.Namespace) -> int:
    results = recipe_benchmark(args, simulate_benchmark)
    output_console().print(results_table(results))
    write_json(args.json, results)
    return 0


def recipe_benchmark(args: argparse.Namespace, benchmark: Callable[..., dict]) -> dict:
    """``benchmark(recipe, overrides, rounds, on_round)`` under a spinner naming each round done."""
    return with_spinner(
        lambda say: benchmark(
            args.recipe,
            args.overrides,
            args.rounds,
            lambda run, server_round: say(f"{run}: round {server_round} done"),
        )
    )


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


def add_demo_benchmark(benchmarks: argparse._SubParsersAction) -> None:
    parser = add_recipe_benchmark(
        benchmarks,
        "demo",
        "the demo's wall time against a plain FedAvg loop",
        "Run a recipe (default: the demo's, all its rounds) as `fedlora simulate` runs it and "
        "a plain FedAvg loop over the same model, data, clients and rounds in this process "
        "(torch's threads on every core, no Flower); each timed whole, and their ratio.",
        None,
        run_bench_demo,
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        metavar="N",
        help="run the pair N times, one after the other; report the pair of median ratio",
    )


def run_bench_demo(args: argparse.Namespace) -> int:
    results = recipe_benchmark(args, functools.partial(demo_benchmark, repeats=args.repeats))
    setup = results["setup"]
    table = Table(
        title=(
            f"{setup['recipe']}: {setup['model']}, {setup['clients']} clients, "
            f"{setup['rounds']} rounds, {setup['cores']} cores"
        )
    )
    if len(results["pairs"]) > 1:
        ratios = ", ".join(f"{pair['ratio']:.2f}x" for pair in results["pairs"])
        table.caption = f"the pair of median ratio; the {setup['repeats']} pairs' ratios: {ratios}"
    for column in ("run", "wall", "ratio", "client accuracy"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{setup['strategy']} in fedlora ({setup['engine']})",
        f"{results['simulation_seconds']:.1f} s",
        f"{results['ratio']:.2f}x",
        f"{results['simulation_client_accuracy']:.4f}",
    )
    table.add_row(
        f"plain {setup['baseline']} loop",
        f"{results['plain_seconds']:.1f} s",
        "1.00x",
        f"{results['plain_client_accuracy']:.4f}",
    )
    output_console().print(table)
    write_json(args.json, results)
    return 0


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
    add_recipe_option(parser, default=MULTI_GPU_RECIPE)
    parser.add_argument(
        "--gpus", type=comma_ints, default=(1, 2), metavar="N,N", help="GPU counts (default 1,2)"
    )
    add_rounds(parser)
    add_output_arguments(parser, "runs/bench-gpus", "the runs' directories, DIR/gpus-N")
    parser.set_defaults(handler=run_bench_gpus)


def add_output_arguments(parser: argparse.ArgumentParser, out: str, out_help: str) -> None:
    """``--json FILE``, ``--out DIR`` (default ``out``) and the run-config overrides."""
    add_json(parser)
    add_out(parser, f"{out_help} (default: {out})", default=Path(out))
    add_overrides(parser)


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


def add_train_benchmark(benchmarks: argparse._SubParsersAction) -> None:
    parser = benchmarks.add_parser(
        "train",
        help="the clients' training tokens/s in a simulation vs the plain LoRA loop",
        description=(
            "On one device: the plain peft LoRA loop at the batch a group of clients adds up to, "
            "the group trained together in one forward/backward, and the recipe (default: "
            "multi-gpu.toml) in its engine (Flower's on Ray, or in process); tokens/s, their ratios, MFU and round times."
        ),
    )
    add_recipe_option(parser, default=MULTI_GPU_RECIPE)
    add_rounds(parser)
    parser.add_argument(
        "--group",
        type=int,
        metavar="N",
        help="clients per batch (default: per GPU in the recipe, or 4)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=TIMED_STEPS,
        metavar="N",
        help=f"timed steps (default {TIMED_STEPS})",
    )
    parser.add_argument(
        "--warmup", type=int, default=2, metavar="N", help="untimed steps (default 2)"
    )
    parser.add_argument(
        "--no-federation",
        action="store_true",
        help="the in-process loops only: no simulation",
    )
    add_output_arguments(parser, "runs/bench-train", "the simulation's run directory")
    parser.set_defaults(handler=run_bench_train)


def run_bench_train(args: argparse.Namespace) -> int:
    federation = not args.no_federation
    if federation:
        check_out_dir(args.out)
    results = with_spinner(
        lambda say: train_benchmark(
            args.recipe,
            args.overrides,
            args.rounds,
            args.group,
            args.steps,
            args.warmup,
            args.out,
            say,
            federation,
        )
    )
    setup = results["setup"]
    table = Table(
        title=(
            f"{setup['recipe']} on {results['device']}: {setup['group']} clients x "
            f"{setup['run'].get('batch-size')} rows"
        )
    )
    for column in ("training", "tokens / s", "vs plain", "MFU"):
        table.add_column(column, justify="right")
    rows = [
        (
            "plain loop, float32 weights",
            results["float32_tokens_per_s"],
            1 / results["speedup"],
            results["float32_mfu"],
        ),
        ("plain loop", results["plain_tokens_per_s"], 1.0, results["mfu"]),
        (
            "grouped clients",
            results["grouped_tokens_per_s"],
            results["grouped_ratio"],
            results["grouped_mfu"],
        ),
    ]
    if federation:
        rows += [
            (
                "federation (clients' training)",
                results["training_tokens_per_s"],
                results["training_ratio"],
                None,
            ),
            (
                "federation (training exchange)",
                results["federation_tokens_per_s"],
                results["ratio"],
                results["federation_mfu"],
            ),
            (
                "federation (whole rounds)",
                results["round_tokens_per_s"],
                results["round_tokens_per_s"] / results["plain_tokens_per_s"],
                None,
            ),
        ]
    for name, rate, ratio, utilisation in rows:
        table.add_row(
            name,
            f"{rate:,.0f}",
            f"{ratio:.2f}x",
            "" if utilisation is None else f"{utilisation:.1%}",
        )
    output_console().print(table)
    if federation:
        output_console().print(
            f"round 1 {results['first_round_seconds']:.1f} s, later rounds "
            f"{results['later_round_seconds']:.1f} s"
        )
    write_json(args.json, results)
    return 0


def add_scale_benchmark(benchmarks: argparse._SubParsersAction) -> None:
    parser = benchmarks.add_parser(
        "scale",
        help="the server's memory and seconds per round with many clients",
        description=(
            "Simulate a recipe of many clients, few sampled a round (default: scale.toml, 1000 "
            "tiny-BERT clients, 10 a round, 50 rounds); per round the resident memory of the "
            "process running the ServerApp and the round's seconds."
        ),
    )
    add_recipe_option(parser, default=SCALE_RECIPE)
    add_rounds(parser)
    parser.add_argument(
        "--clients", type=int, metavar="N", help="simulated clients (num-supernodes)"
    )
    add_output_arguments(parser, "runs/bench-scale", "the run's directory")
    parser.set_defaults(handler=run_bench_scale)


def run_bench_scale(args: argparse.Namespace) -> int:
    check_out_dir(args.out)
    results = with_spinner(
        lambda say: scale_benchmark(
            args.recipe, args.overrides, args.rounds, args.clients, args.out, say
        )
    )
    table = Table(title=f"{results['setup']['recipe']}: {results['setup']['simulation']}")
    for column in ("round", "resident MiB", "seconds"):
        table.add_column(column, justify="right")
    for row in results["rounds"]:
        table.add_row(str(row["round"]), f"{row['rss_mb']:.0f}", f"{row['seconds']:.2f}")
    output_console().print(table)
    write_json(args.json, results)
    return 0
