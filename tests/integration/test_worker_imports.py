"""A ClientApp's process, started as Flower starts one: it loads neither Opacus nor flwr-datasets
before it needs them (with the SciPy statistics both pull in, about 1.5 s of a Ray worker's
start-up): a run without DP never imports Opacus, and a worker that reads the run's shared splits
never partitions; at its exit the garbage collector skips the live heap
(`fedlora.process_exit`)."""

import json
import subprocess
import sys

import pytest

from fedlora.config import RunConfig
from fedlora.data.shared_splits import write_splits

CONFIG = {"model": "tiny-bert", "max_length": 32, "partitioner": "iid"}
CHILD = f"""
import atexit, gc, json, os, sys
from pathlib import Path

# registered before the apps' own handlers, so it runs after them, last
atexit.register(lambda: os.write(1, f"frozen {{gc.get_freeze_count()}}\\n".encode()))
import clients.app
from clients.worker import Worker
from fedlora.config import RunConfig

def loaded():
    return sorted(name for name in ("opacus", "flwr_datasets") if name in sys.modules)

imported = loaded()
Worker(RunConfig(**{CONFIG!r})).data(1, 4, Path(sys.argv[1]))
print(json.dumps([imported, loaded()]), flush=True)
"""


@pytest.fixture(scope="module")
def child_output(tmp_path_factory) -> list[str]:
    """The lines a fresh process prints that imports the ClientApp and reads shared splits."""
    splits = tmp_path_factory.mktemp("splits")
    write_splits(splits, RunConfig(**CONFIG), 4)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(splits)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return done.stdout.splitlines()


def test_the_apps_and_a_worker_reading_shared_splits_load_neither(child_output):
    assert json.loads(child_output[-2]) == [[], []]


def test_the_live_heap_is_frozen_at_exit(child_output):
    kind, count = child_output[-1].split()
    assert kind == "frozen" and int(count) > 100_000  # torch and transformers' objects
