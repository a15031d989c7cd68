"""A ClientApp's process loads neither Opacus nor flwr-datasets before it needs them (with the SciPy
statistics both pull in, about 1.5 s of a Ray worker's start-up): a run without DP never imports
Opacus, and a worker that reads the run's shared splits never partitions."""

import json
import subprocess
import sys

from fedlora.config import RunConfig
from fedlora.data.shared_splits import write_splits

CONFIG = {"model": "tiny-bert", "max_length": 32, "partitioner": "iid"}
CHILD = f"""
import json, sys
from pathlib import Path
import clients.app
from clients.worker import Worker
from fedlora.config import RunConfig

def loaded():
    return sorted(name for name in ("opacus", "flwr_datasets") if name in sys.modules)

imported = loaded()
Worker(RunConfig(**{CONFIG!r})).data(1, 4, Path(sys.argv[1]))
print(json.dumps([imported, loaded()]))
"""


def test_the_apps_and_a_worker_reading_shared_splits_load_neither(tmp_path):
    write_splits(tmp_path, RunConfig(**CONFIG), 4)
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert json.loads(done.stdout.splitlines()[-1]) == [[], []]
