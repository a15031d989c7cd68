"""``fedlora recipes``: the shipped recipes by name, each with its one-line description."""

from __future__ import annotations

import argparse

from simulations.recipe_files import RECIPES_DIR, shipped_recipes


def add_recipes_command(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "List the shipped recipes; a command takes a recipe's name in place of its file "
        "(fedlora simulate tiny)."
    )
    parser.set_defaults(handler=run_recipes)


def run_recipes(args: argparse.Namespace) -> int:
    recipes = shipped_recipes()
    width = max(map(len, recipes))
    for name, description in recipes.items():
        print(f"{name:<{width}}  {description}")
    print(f"\n(in {RECIPES_DIR})")
    return 0


COMMANDS = {"recipes": add_recipes_command}
