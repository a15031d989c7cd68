"""The options the commands share, spelled the same everywhere: a recipe (a file or a shipped
recipe's name), ``--out DIR``, ``--overwrite``, ``--strategy``, ``--rounds N``, ``--json FILE``,
``KEY=VALUE`` overrides; and the console the results go to."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from simulations.recipe_files import recipe_file

RUNS_DIR = Path("runs")
PIPE_WIDTH = 160
RECIPE_HELP = "a recipe file, or a shipped recipe's name (fedlora recipes lists them)"


def add_recipe(parser: argparse.ArgumentParser) -> None:
    """The recipe, the command's first positional argument."""
    parser.add_argument("recipe", type=recipe_file, metavar="RECIPE", help=RECIPE_HELP)


def add_recipe_option(parser: argparse.ArgumentParser, default: Path) -> None:
    """``--recipe``, for a command that has a default recipe (so that ``KEY=VALUE`` overrides
    can follow the command directly)."""
    parser.add_argument(
        "--recipe",
        type=recipe_file,
        default=default,
        metavar="RECIPE",
        help=f"{RECIPE_HELP} (default: {default.stem})",
    )


def add_out(parser: argparse.ArgumentParser, help_text: str, default: Path | None = None) -> None:
    parser.add_argument("--out", type=Path, default=default, metavar="DIR", help=help_text)


def add_overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace what an earlier run left in the output directory",
    )


def add_strategy(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strategy", metavar="NAME", help="the method (run key 'strategy')")


def add_rounds(parser: argparse.ArgumentParser, default: int | None = None) -> None:
    parser.add_argument(
        "--rounds",
        type=int,
        default=default,
        metavar="N",
        help="server rounds (run key 'num-server-rounds')"
        + ("" if default is None else f" (default: {default})"),
    )


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the results here")


def add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="run-config overrides of the recipe's [run] table, e.g. learning-rate=1e-3 "
        "(docs/config.md lists every key)",
    )


def comma_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}")


def output_console() -> Console:
    """stdout, wide enough for the results table when it is not a terminal (a pipe, a log)."""
    console = Console()
    return console if console.is_terminal else Console(width=PIPE_WIDTH)
