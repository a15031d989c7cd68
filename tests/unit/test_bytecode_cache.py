"""fedlora's bytecode cache: where a package ships no bytecode and Python may not write any, a
process and those it starts compile it once into ``$FEDLORA_CACHE/bytecode`` and later processes
read it; nowhere else does it change how Python imports. Each case runs in a fresh interpreter
(the cache changes the process's import settings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
PROBE = """
import json, subprocess, sys
from fedlora.bytecode_cache import use_bytecode_cache
folder = use_bytecode_cache("probe_pkg")
import probe_pkg.mod
child = subprocess.run(
    [sys.executable, "-c", "import sys; print(sys.pycache_prefix, sys.dont_write_bytecode)"],
    capture_output=True, text=True, check=True,
).stdout.split()
print(json.dumps({"folder": folder and str(folder), "answer": probe_pkg.mod.ANSWER, "child": child}))
"""


def probe_package(tmp_path: Path) -> Path:
    package = tmp_path / "site" / "probe_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text("ANSWER = 42\n")
    return package


def run_probe(tmp_path: Path, **env: str) -> dict:
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPYCACHEPREFIX"}
    environment.update(
        {
            "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)]),
            "FEDLORA_CACHE": str(tmp_path / "cache"),
            "PYTHONDONTWRITEBYTECODE": "1",
            **env,
        }
    )
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=environment, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


def cached_bytecode(tmp_path: Path) -> list[Path]:
    """The probe package's bytecode in the cache."""
    return sorted((tmp_path / "cache" / "bytecode").rglob("probe_pkg/*.pyc"))


def test_a_package_without_bytecode_is_compiled_once_into_the_cache(tmp_path):
    package = probe_package(tmp_path)
    first = run_probe(tmp_path)
    folder = tmp_path / "cache" / "bytecode"
    assert first["folder"] == str(folder) and first["answer"] == 42
    assert first["child"] == [str(folder), "False"]  # the processes it starts use it too
    written = cached_bytecode(tmp_path)
    assert [path.name.split(".")[0] for path in written] == ["__init__", "mod"]
    assert not (package / "__pycache__").exists()  # nothing beside the sources
    stamps = [path.stat().st_mtime_ns for path in written]

    again = run_probe(tmp_path)
    assert again["folder"] == str(folder) and again["answer"] == 42
    assert cached_bytecode(tmp_path) == written
    assert [path.stat().st_mtime_ns for path in written] == stamps  # read, not compiled again


def test_python_is_left_as_it_is_where_the_package_has_bytecode(tmp_path):
    package = probe_package(tmp_path)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True)
    result = run_probe(tmp_path)
    assert result["folder"] is None and result["answer"] == 42
    assert result["child"] == ["None", "True"]
    assert not (tmp_path / "cache").exists()


def test_the_switch_and_a_bytecode_folder_of_the_users_own_leave_python_as_it_is(tmp_path):
    probe_package(tmp_path)
    off = run_probe(tmp_path, FEDLORA_BYTECODE_CACHE="off")
    assert off["folder"] is None and off["child"] == ["None", "True"]
    own = str(tmp_path / "own")
    users = run_probe(tmp_path, PYTHONPYCACHEPREFIX=own, PYTHONDONTWRITEBYTECODE="")
    assert users["folder"] is None and users["child"] == [own, "False"]
    assert not (tmp_path / "cache").exists()


def test_the_command_line_and_both_apps_load_it_before_torch():
    for package in ("cli", "clients", "strategies"):
        loaded = subprocess.run(
            [sys.executable, "-c", f"import sys, {package}; print(sorted(sys.modules))"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "'fedlora.bytecode_cache'" in loaded and "'torch'" not in loaded, package
