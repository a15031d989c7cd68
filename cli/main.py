"""The ``fedlora`` entry point: the commands by name, each group's module imported only when one of
its commands runs (so ``fedlora --help`` and ``--version`` import neither torch nor Flower).

``key=value`` overrides of a recipe's run table may stand anywhere after the command, before or
after the options. A bad key or value exits with status 2, a failed run with 1, Ctrl-C with 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from fedlora.errors import ConfigError, SimulationError
from fedlora.process_exit import freeze_heap_at_exit

COMMANDS = {
    "demo": (
        "cli.simulate",
        "the main job: FedEx-LoRA on MiniLM and BBC News, 10 clients of ranks 4, 8, 16",
    ),
    "simulate": ("cli.simulate", "run a recipe (TOML) in Flower's simulation engine on Ray"),
    "compare": ("cli.simulate", "run every method on one recipe; results table and plots"),
    "dp-sweep": (
        "cli.simulate",
        "run strategies at several privacy budgets (DP-SGD); accuracy vs epsilon",
    ),
    "recipes": ("cli.recipes", "list the shipped recipes"),
    "baselines": (
        "cli.baselines",
        "the pretrained model, centralized LoRA and local-only training on a recipe's task",
    ),
    "bench": ("cli.bench", "benchmarks"),
    "deploy": ("cli.deploy", "run on real devices: SuperLink and SuperNodes"),
}
"""Each command's module and one-line help; the module's ``COMMANDS`` maps the command's name to
the function that adds its arguments and handler to its parser."""


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the ``selected`` command's arguments are added (its module imported)."""
    parser = argparse.ArgumentParser(prog="fedlora", description="Federated LoRA fine-tuning.")
    parser.add_argument("--version", action="version", version=f"fedlora {installed_version()}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        command = commands.add_parser(name, help=help_text, description=help_text)
        if name == selected:
            importlib.import_module(module).COMMANDS[name](command)
    return parser


def selected_command(argv: Sequence[str]) -> str | None:
    """The command named in ``argv`` (its first argument not an option), if it is one."""
    first = next((arg for arg in argv if not arg.startswith("-")), None)
    return first if first in COMMANDS else None


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    freeze_heap_at_exit()
    parser = build_parser(selected_command(argv))
    args, unparsed = parser.parse_known_args(argv)
    if unparsed:  # key=value pairs after options that follow a positional argument
        if not hasattr(args, "overrides") or any(
            arg.startswith("-") or "=" not in arg for arg in unparsed
        ):
            parser.error(f"unrecognized arguments: {' '.join(unparsed)}")
        args.overrides = [*args.overrides, *unparsed]
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"fedlora: error: {error}", file=sys.stderr)
        return 2
    except SimulationError as error:
        print(f"fedlora: simulation failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(getattr(args, "interrupted_hint", "fedlora: interrupted"), file=sys.stderr)
        return 130


def installed_version() -> str:
    """fedlora's installed version, or "(not installed)" when run from a source tree."""
    try:
        return version("fedlora")
    except PackageNotFoundError:
        return "(not installed)"
