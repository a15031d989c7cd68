"""The shipped recipes: where they are, their one-line descriptions, and a recipe named by its
file or by a shipped recipe's name (``demo`` for ``simulations/recipes/demo.toml``)."""

from __future__ import annotations

import re
from pathlib import Path

RECIPES_DIR = Path(__file__).parent / "recipes"
DEMO_RECIPE = RECIPES_DIR / "demo.toml"
RECIPE_SUFFIX = ".toml"


def recipe_file(source: str | Path) -> Path:
    """``source`` as a path; a name that is no file but a shipped recipe's is that recipe."""
    path = Path(source)
    shipped = RECIPES_DIR / f"{path.name}{RECIPE_SUFFIX}"
    if not path.exists() and path.name == str(source) and shipped.is_file():
        return shipped
    return path


def shipped_recipes() -> dict[str, str]:
    """Each shipped recipe's name and description (the first sentence of its leading comment)."""
    return {
        path.stem: description(path.read_text(encoding="utf-8"))
        for path in sorted(RECIPES_DIR.glob(f"*{RECIPE_SUFFIX}"))
    }


def description(text: str) -> str:
    """The leading comment's first sentence or clause, without a parenthesised command."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    comment = " ".join(lines)
    first = re.split(r"(?<=[^.\s])[.:](?:\s|$)", comment, maxsplit=1)[0]
    return re.sub(r"\s*\(`[^`]*`[^)]*\)", "", first).strip()
