"""``fedlora baselines RECIPE``: the pretrained model, centralized LoRA and local-only training on
the recipe's task (`simulations.baselines`), a results table and ``DIR/results.csv``."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from cli.options import RUNS_DIR, add_out, add_overrides, add_recipe, add_rounds, output_console
from simulations.baselines import BASELINES_CSV, run_baselines
from simulations.recipes import load_recipe, resolve


def add_baselines_command(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Evaluate RECIPE's base model without fine-tuning, train one LoRA model on the pooled "
        "data of all its clients with the federation's total steps and examples, and train "
        "each client alone for its federated steps (mean and standard deviation); in this "
        f"process, without Flower. Write DIR/{BASELINES_CSV} (default DIR: "
        "runs/baselines/<recipe name>)."
    )
    add_recipe(parser)
    add_out(parser, "the output directory")
    add_rounds(parser)
    add_overrides(parser)
    parser.set_defaults(handler=run_baselines_command)


def run_baselines_command(args: argparse.Namespace) -> int:
    recipe = resolve(load_recipe(args.recipe), args.overrides, None, args.rounds)
    out_dir = args.out or RUNS_DIR / "baselines" / recipe.name
    progress = Console(stderr=True)
    progress.print(f"{recipe.name}: baselines on {recipe.run_config.dataset}")
    rows = run_baselines(
        recipe, out_dir, lambda row: progress.print(f"{row['baseline']}: {row['seconds']:.0f} s")
    )
    console = output_console()
    console.print(baselines_table(recipe.name, rows))
    console.print(f"{out_dir}: {BASELINES_CSV}")
    return 0


def baselines_table(name: str, rows: list[dict]) -> Table:
    metric = rows[0]["generation_metric"] if rows else None
    table = Table(title=f"{name}: baselines on the server's held-out set")
    columns = ("baseline", "steps", "accuracy", "loss", metric or "generation", "seconds")
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            row["baseline"],
            str(row["steps"]),
            with_spread(row, "accuracy"),
            with_spread(row, "loss"),
            with_spread(row, "generation"),
            f"{row['seconds']:.0f}",
        )
    return table


def with_spread(row: dict, score: str) -> str:
    """The score to 3 decimals, ``± std`` where there is a spread over clients; ``-`` if none."""
    if row[score] is None:
        return "-"
    spread = row.get(f"{score}_std")
    return f"{row[score]:.3f}" + ("" if spread is None else f" ± {spread:.3f}")


COMMANDS = {"baselines": add_baselines_command}
