"""A run directory's files: the resolved recipe, the ServerApp's per-round metrics (JSONL, and CSV
written after the run), Flower's log, and the base store of the methods that change the base.

A run directory belongs to one experiment: a new run takes only an empty (or absent) one, or,
with ``overwrite``, an earlier run's directory, which it empties first.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fedlora.errors import ConfigError
from strategies.run_record import MANIFEST_FILE, STATUS_FILE

CONFIG_FILE = "config.toml"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
FLOWER_LOG = "flower.log"
BASE_STORE = "base"
"""`strategies.server_app` writes each round's base change here (FedEx-LoRA, FLoRA)."""
RUN_MARKERS = (STATUS_FILE, MANIFEST_FILE, CONFIG_FILE, METRICS_JSONL)
"""Files that only a run leaves: a directory holding one of them is a run directory."""
FOLLOW_INTERVAL = 0.5
"""Seconds between looks at metrics.jsonl while a run goes on."""

MetricsRow = dict
RowCallback = Callable[[MetricsRow], None]


def check_out_dir(out_dir: Path) -> None:
    """Make the output directory now, so that one that cannot be made (an existing file, a file on
    its path, a folder this process may not write in) is refused, named, before anything runs."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {str(out_dir)!r} is a file, not a directory")
    file_on_path = next((p for p in out_dir.parents if p.exists() and not p.is_dir()), None)
    if file_on_path is not None:
        raise ConfigError(f"--out {str(out_dir)!r}: {str(file_on_path)!r} on its path is a file")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--out {str(out_dir)!r} cannot be made: {error.strerror}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {str(out_dir)!r} is not writable")


class RunDirTaken(ConfigError):
    """The run directory holds files and may not be reused."""


def claim_run_dir(run_dir: Path, overwrite: bool = False) -> None:
    """Make ``run_dir`` for a new run. A directory with files is refused, unless ``overwrite``
    is set and it is an earlier run's (it holds a run's record or metrics): then everything in it
    goes, so that no stale row, base change or exported file is read as the new run's."""
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunDirTaken(
                f"run directory {run_dir} is not empty: pass --overwrite to replace the run in "
                f"it, or --resume {run_dir} to continue it"
            )
        if not any((run_dir / name).exists() for name in RUN_MARKERS):
            raise RunDirTaken(
                f"run directory {run_dir} holds files but no run (none of {list(RUN_MARKERS)}): "
                "--overwrite empties only a run's directory; choose another --out"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def read_metrics(run_dir: Path) -> list[MetricsRow]:
    """The rows of ``run_dir/metrics.jsonl`` (none when it does not exist)."""
    path = run_dir / METRICS_JSONL
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics_csv(run_dir: Path, rows: list[MetricsRow]) -> Path:
    """``metrics.csv``: the JSONL rows, columns in order of first appearance, a nested dict as
    ``key.subkey`` columns, None as empty."""
    flat_rows = [flat(row) for row in rows]
    columns = list(dict.fromkeys(key for row in flat_rows for key in row))
    path = run_dir / METRICS_CSV
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, columns)
        writer.writeheader()
        writer.writerows(flat_rows)
    return path


def flat(row: MetricsRow) -> dict:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``, one level deep, as the ServerApp's rows nest."""
    columns = {}
    for key, value in row.items():
        if isinstance(value, dict):
            columns.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            columns[key] = value
    return columns


class MetricsFollower:
    """Calls ``on_row`` for each complete row appended to a metrics.jsonl, from a thread."""

    def __init__(self, path: Path, on_row: RowCallback) -> None:
        self.path, self.on_row = path, on_row
        self.offset = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._follow, name="metrics-follower", daemon=True)

    def _follow(self) -> None:
        while not self.stopped.wait(FOLLOW_INTERVAL):
            self.poll()

    def poll(self) -> None:
        """Report the rows completed since the last look."""
        if not self.path.exists():
            return
        with self.path.open("rb") as file:
            file.seek(self.offset)
            text = file.read()
        complete = text[: text.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode().splitlines():
            if line.strip():
                self.on_row(json.loads(line))


@contextmanager
def following(path: Path, on_row: RowCallback | None) -> Iterator[None]:
    """Report rows of ``path`` to ``on_row`` while the block runs, the last ones after it."""
    if on_row is None:
        yield
        return
    follower = MetricsFollower(path, on_row)
    follower.thread.start()
    try:
        yield
    finally:
        follower.stopped.set()
        follower.thread.join()
        follower.poll()
