"""Who owns a run directory and how its run went: the status marker and the manifest.

``status`` holds one line: ``running`` from the start, then ``finished``, ``interrupted`` or
``failed: <reason>``. ``manifest.json`` says what made the run: the versions of the packages
that shape its numbers, the project's git commit (when it is a git checkout), the device, the
command line, the start time, and the Flower run id of every run that wrote to the directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from fedlora.run_records.atomic_files import write_json_atomic, write_text_atomic

STATUS_FILE = "status"
MANIFEST_FILE = "manifest.json"
EXPORT_DIR = "export"
RUNNING, FINISHED, INTERRUPTED = "running", "finished", "interrupted"
FAILED_PREFIX = "failed: "
PACKAGES = ("fedlora", "flwr", "torch", "transformers", "peft", "opacus")
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def write_status(run_dir: Path, status: str) -> None:
    write_text_atomic(run_dir / STATUS_FILE, status + "\n")


def mark_failed(run_dir: Path, reason: str) -> None:
    """``failed: <reason>``, the reason on one line."""
    one_line = " ".join(reason.split()) or "unknown reason"
    write_status(run_dir, FAILED_PREFIX + one_line)


def read_status(run_dir: Path) -> str | None:
    """The run's status line (None when the directory has no marker)."""
    path = run_dir / STATUS_FILE
    return path.read_text().strip() if path.exists() else None


SECRET_OPTIONS = ("--token",)
"""Options whose values are secrets: Flower's ServerApp process gets its Runtime API token so."""


def without_secrets(argv: list[str]) -> list[str]:
    """``argv`` with the value of every `SECRET_OPTIONS` option (``--token T`` or ``--token=T``)
    replaced by ``***``."""
    kept, hide_next = [], False
    for arg in argv:
        option = arg.split("=", 1)[0]
        if hide_next:
            kept.append("***")
        elif option in SECRET_OPTIONS and "=" in arg:
            kept.append(f"{option}=***")
        else:
            kept.append(arg)
        hide_next = not hide_next and arg in SECRET_OPTIONS
    return kept


def record_start(run_dir: Path, device: str, flower_run_id: int | None) -> dict:
    """Write the manifest of a run starting now and mark the directory ``running``; a run that
    continues the directory's experiment adds its start and Flower run id to the manifest."""
    path = run_dir / MANIFEST_FILE
    now = datetime.now(UTC).isoformat(timespec="seconds")
    start = {"started": now, "flower_run_id": flower_run_id, "command": without_secrets(sys.argv)}
    if path.exists():
        manifest = read_manifest(run_dir)
        manifest["runs"].append(start)
    else:
        manifest = {
            "packages": package_versions(),
            "git_commit": git_commit(),
            "device": device,
            "runs": [start],
        }
    write_json_atomic(path, manifest)
    write_status(run_dir, RUNNING)
    return manifest


def read_manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / MANIFEST_FILE).read_text())


def package_versions() -> dict[str, str | None]:
    """The installed version of each package in `PACKAGES` (None when not installed)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """The commit checked out where this code lies, with ``+dirty`` when files changed; None
    outside a git checkout."""
    if not (PROJECT_ROOT / ".git").exists():
        return None
    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def git(*args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(PROJECT_ROOT), *args],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return done.stdout.strip()
