"""The ``fedlora`` entry point: ``--help`` and ``--version`` import neither torch nor Flower, the
shipped recipes are listed and can be named without their path."""

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from cli.main import COMMANDS, build_parser, main
from simulations.recipe_files import DEMO_RECIPE, RECIPES_DIR, description, shipped_recipes

ROOT = Path(__file__).parents[2]
HEAVY_MODULES = ("torch", "flwr", "transformers", "peft", "opacus", "ray", "rich")


def modules_imported_by(argv: list[str]) -> set[str]:
    """The heavy modules a fresh interpreter has imported after ``main(argv)``."""
    script = (
        "import sys\n"
        "from cli.main import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(','.join(m for m in {HEAVY_MODULES!r} if m in sys.modules), file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return set(filter(None, result.stderr.strip().split(",")))


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["recipes"]])
def test_help_version_and_recipes_import_no_heavy_library(argv):
    assert modules_imported_by(argv) == set()


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedlora {version('fedlora')}"


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name, (_, help_text) in COMMANDS.items():
        assert name in out and help_text.split()[0] in out


def test_recipes_lists_each_shipped_recipe_with_its_description(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    recipes = shipped_recipes()
    assert sorted(recipes) == sorted(path.stem for path in RECIPES_DIR.glob("*.toml"))
    for name, text in recipes.items():
        assert text and any(line.split() == [name, *text.split()] for line in lines), name
    assert recipes["tiny"] == "A seconds-long run for tests"


def test_description_is_the_comments_first_clause_without_a_command():
    text = "# Every method, quicker (`fedlora compare x.toml`): MiniLM on\n# BBC News.\n[run]\n"
    assert description(text) == "Every method, quicker"
    assert description("# One line. Then more\n") == "One line"
    assert description("[run]\n") == ""


def test_a_shipped_recipe_is_named_without_its_path(tmp_path, monkeypatch):
    parser = build_parser("simulate")
    assert parser.parse_args(["simulate", "tiny"]).recipe == RECIPES_DIR / "tiny.toml"
    assert parser.parse_args(["simulate", str(DEMO_RECIPE)]).recipe == DEMO_RECIPE
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").write_text("[run]\n")  # a file of that name comes first
    assert parser.parse_args(["simulate", "tiny"]).recipe == Path("tiny")


def test_an_unknown_recipe_name_is_named(capsys):
    assert main(["simulate", "no-such-recipe"]) == 2
    assert "recipe 'no-such-recipe' does not exist" in capsys.readouterr().err


def test_a_benchmark_takes_overrides_after_its_default_recipe():
    parser = build_parser("bench")
    args = parser.parse_args(["bench", "simulate", "learning-rate=1e-3"])
    assert (args.recipe, args.overrides) == (DEMO_RECIPE, ["learning-rate=1e-3"])
    args = parser.parse_args(["bench", "gpus", "--recipe", "tiny", "seed=1"])
    assert (args.recipe, args.overrides) == (RECIPES_DIR / "tiny.toml", ["seed=1"])
