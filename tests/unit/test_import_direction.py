"""Imports point one way: the core ``fedlora`` <- ``strategies``, ``clients`` <- ``simulations``,
``deployment`` <- ``cli``. Every module's imports (its top level and inside functions) are read
with ``ast``; a package imports its own modules and those of the layers below, never a sibling of
its own layer; the core imports no Flower."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
LAYERS = {
    "fedlora": 0,
    "strategies": 1,
    "clients": 1,
    "simulations": 2,
    "deployment": 2,
    "cli": 3,
}
"""Each package's layer: a package may import the packages of lower layers only."""
FORBIDDEN_IN_CORE = ("flwr",)


def imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, module) of every import in the file; relative imports resolved to the package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = package if node.level else node.module
            found.append((node.lineno, module or package))
    return found


def violations(package: str, root: Path = ROOT) -> list[str]:
    """``file:line imports module`` for each import against the direction."""
    found = []
    for path in sorted((root / package).rglob("*.py")):
        for line, module in imported_modules(path, package):
            top = module.split(".")[0]
            against = (top in LAYERS and top != package and LAYERS[top] >= LAYERS[package]) or (
                package == "fedlora" and top in FORBIDDEN_IN_CORE
            )
            if against:
                found.append(f"{path.relative_to(root)}:{line} imports {module}")
    return found


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_imports_point_one_way(package):
    assert violations(package) == []


def test_an_import_against_the_direction_is_found(tmp_path):
    """The check itself: a core module importing the command line, and one importing Flower
    inside a function, are both reported."""
    core = tmp_path / "fedlora"
    core.mkdir()
    (core / "upward.py").write_text("import os\nfrom cli.main import main\n")
    (core / "hidden.py").write_text("def f():\n    from flwr.app import Context\n")
    (core / "inside.py").write_text(
        "from . import upward\nfrom fedlora.errors import ConfigError\n"
    )
    assert violations("fedlora", tmp_path) == [
        "fedlora/hidden.py:2 imports flwr.app",
        "fedlora/upward.py:2 imports cli.main",
    ]


def test_checking_the_apps_references_imports_no_heavy_library():
    """``flwr run`` and ``flwr build`` check each component of ``[tool.flwr.app.components]`` with
    ``importlib.util.find_spec``, which imports its packages: they stay light (a second or so per
    ``flwr run``, not the 5 s of torch, transformers and peft)."""
    script = (
        "import importlib.util, sys, tomllib\n"
        "components = tomllib.load(open('pyproject.toml', 'rb'))['tool']['flwr']['app']"
        "['components']\n"
        "for reference in components.values():\n"
        "    assert importlib.util.find_spec(reference.split(':')[0]) is not None\n"
        "print(','.join(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == ""
