"""``fedlora bench``: ``aggregate`` (every rule's aggregation: seconds, error, bytes) and the
benchmarks that run simulations (`cli.bench_simulate`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.bench_simulate import (
    add_demo_benchmark,
    add_gpus_benchmark,
    add_scale_benchmark,
    add_simulate_benchmark,
    add_train_benchmark,
)
from cli.options import add_json, comma_ints, output_console
from fedlora.bench.aggregate import (
    CPU_SAMPLED_MODULES,
    BenchConfig,
    describe_device,
    iter_aggregate_benchmark,
    preset,
    selected_rules,
)
from fedlora.errors import ConfigError
from fedlora.rules.flexlora import SVD_PATHS


def names(text: str) -> tuple[str, ...]:
    """Names separated by commas."""
    return tuple(name.strip() for name in text.split(","))


def method_names(text: str) -> tuple[str, ...]:
    """'all' (every implemented rule) or rule names separated by commas."""
    return () if text == "all" else names(text)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_bench_commands(bench: argparse.ArgumentParser) -> None:
    benchmarks = bench.add_subparsers(title="benchmarks", metavar="BENCHMARK", required=True)
    add_aggregate_benchmark(benchmarks)
    add_simulate_benchmark(benchmarks)
    add_demo_benchmark(benchmarks)
    add_gpus_benchmark(benchmarks)
    add_train_benchmark(benchmarks)
    add_scale_benchmark(benchmarks)
    add_cli_benchmark(benchmarks)


def add_aggregate_benchmark(benchmarks: argparse._SubParsersAction) -> None:
    aggregate = benchmarks.add_parser(
        "aggregate",
        help="seconds, error and bytes per aggregation of every rule",
        description=(
            "Time every rule's aggregation on a Llama-7B-shaped adapter (32 layers x q,k,v,o of "
            "4096 x 4096, r 16) with 10 and 100 clients, next to a naive loop over clients and the "
            "stacked GEMM alone; report the relative error against the ideal update and the bytes "
            "a client sends and receives."
        ),
    )
    add_json(aggregate)
    aggregate.add_argument(
        "--quick",
        action="store_true",
        help="small shapes (4 layers x 4 modules of 256 x 256, r 8, clients 4 and 10)",
    )
    aggregate.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    aggregate.add_argument("--clients", type=comma_ints, help="client counts (default: 10,100)")
    aggregate.add_argument("--layers", type=int, help="transformer layers (default: 32)")
    aggregate.add_argument("--hidden", type=int, help="module size hidden x hidden (default: 4096)")
    aggregate.add_argument("--rank", type=int, help="top (global) LoRA rank (default: 16)")
    aggregate.add_argument(
        "--ranks", type=comma_ints, help="client ranks, cycled over clients (default: all --rank)"
    )
    aggregate.add_argument(
        "--sample-modules",
        type=int,
        metavar="N",
        help=(
            f"time N modules and scale to all (default: all on CUDA and with --quick, "
            f"{CPU_SAMPLED_MODULES} on CPU)"
        ),
    )
    aggregate.add_argument(
        "--methods", type=method_names, help="'all' or names separated by commas (default: all)"
    )
    aggregate.add_argument(
        "--repeats", type=int, help="timed runs per figure, median (default: 1; 3 with --quick)"
    )
    aggregate.add_argument("--seed", type=int, help="seed of the random factors (default: 0)")
    aggregate.add_argument(
        "--flexlora-svd",
        type=names,
        metavar="PATHS",
        help=(
            f"FlexLoRA's SVD paths to time, one row each, separated by commas ({', '.join(SVD_PATHS)};"
            " default: auto alone); an 'auto' row names the path it took"
        ),
    )
    aggregate.set_defaults(handler=run_bench_aggregate)


OPTION_FIELDS = {
    "clients": "clients",
    "layers": "layers",
    "hidden": "hidden",
    "rank": "rank",
    "ranks": "client_ranks",
    "sample_modules": "sample_modules",
    "methods": "methods",
    "repeats": "repeats",
    "seed": "seed",
    "flexlora_svd": "flexlora_svd",
}
"""Command-line option -> BenchConfig field; an option left out keeps the preset's value."""


def bench_config(args: argparse.Namespace) -> BenchConfig:
    config = preset(args.quick, args.device or default_device())
    given = {field: getattr(args, option) for option, field in OPTION_FIELDS.items()}
    return dataclasses.replace(config, **{k: v for k, v in given.items() if v is not None})


def run_bench_aggregate(args: argparse.Namespace) -> int:
    config = bench_config(args)
    planned = len(config.clients) * len(selected_rules(config))
    console = Console(stderr=True)
    results = []
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(f"aggregation on {config.device}", total=planned)
        for row in iter_aggregate_benchmark(config):
            results.append(row)
            progress.update(task, advance=1, description=f"{row['name']}, {row['clients']} clients")
    output_console().print(results_table(config, results))
    if args.json:
        setup = {**dataclasses.asdict(config), "device_name": describe_device(config.device)}
        setup["torch"] = torch.__version__
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"setup": setup, "results": results}, indent=2) + "\n")
    return 0


def seconds_text(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def bytes_text(value: int) -> str:
    return f"{value / 2**20:,.1f} MiB"


def results_table(config: BenchConfig, results: list[dict]) -> Table:
    sampled = f", {config.modules_timed} of {config.modules_total} modules timed and scaled"
    table = Table(
        title=(
            f"Aggregation on {describe_device(config.device)}: {config.modules_total} modules of "
            f"{config.hidden} x {config.hidden}, r {config.rank}"
            + (sampled if config.modules_timed < config.modules_total else "")
        )
    )
    for column in ("method", "clients", "seconds", "naive", "speedup", "GEMM fp32", "GEMM bf16"):
        table.add_column(column, justify="right")
    for column in ("rel. error", "up / client", "down / client"):
        table.add_column(column, justify="right")
    for row in results:
        speedup = row["speedup_vs_naive"]
        error = row["relative_error"]
        table.add_row(
            row["name"],
            str(row["clients"]),
            seconds_text(row["seconds"]),
            seconds_text(row["naive_seconds"]),
            "-" if speedup is None else f"{speedup:.1f}x",
            seconds_text(row["gemm_seconds"]),
            seconds_text(row["gemm_bf16_seconds"]),
            "-" if error is None else f"{error:.2e}",
            bytes_text(row["bytes_up_per_client"]),
            bytes_text(row["bytes_down_per_client"]),
        )
    return table


def add_cli_benchmark(benchmarks: argparse._SubParsersAction) -> None:
    parser = benchmarks.add_parser(
        "cli",
        help="seconds of fedlora --help next to flwr --help",
        description=(
            "Run `fedlora --help` (python -m cli, what the installed command runs) and "
            "`flwr --help` REPEATS times each in fresh processes, alternating; print the median "
            "seconds of each."
        ),
    )
    parser.add_argument("--repeats", type=int, default=5, help="runs of each (default: 5)")
    parser.set_defaults(handler=run_bench_cli)


def run_bench_cli(args: argparse.Namespace) -> int:
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent)) or shutil.which("flwr")
    if flwr is None:
        raise ConfigError("the flwr command is not installed next to this Python or on PATH")
    commands = {"fedlora --help": [sys.executable, "-m", "cli", "--help"]}
    commands["flwr --help"] = [flwr, "--help"]
    seconds = {name: [] for name in commands}
    for _ in range(max(args.repeats, 1)):
        for name, command in commands.items():
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            seconds[name].append(time.perf_counter() - start)
    for name, runs in seconds.items():
        print(f"{name}: {statistics.median(runs):.2f} s (median of {len(runs)})")
    return 0


COMMANDS = {"bench": add_bench_commands}
