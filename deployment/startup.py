"""Per-message start-up of a deployed ClientApp, measured in fresh processes.

On a SuperNode every message runs in a new ``flwr-clientapp`` process, so nothing in memory
survives between messages. `measure_startup` starts ``repeats`` fresh Python processes, one after
another, each doing what a FedEx-LoRA node does before it trains in round 2: import the ClientApp,
load the base model, inject LoRA, restore its drifted base from the node state (the
``context.state`` record Flower hands to the process) into the model, and load its data. The first
process pays the cold caches (files not yet in the page cache); the others show a steady round.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping

IMPORTS = ("import torch", "import transformers, peft", "import flwr", "import the apps")
LOADING = ("base model", "LoRA injection", "state restore", "data")
PHASES = ("interpreter", *IMPORTS, *LOADING, "exit")
"""``interpreter``: process start to this module's first line; the imports in the order the
ClientApp's own imports pull them in (the apps' with flwr-datasets, which a node imports when it
partitions its data); the loading; ``exit``: from ready to the process's end."""


def measure_startup(run_config: Mapping[str, str | int | float], rank: int, repeats: int) -> dict:
    """Seconds per phase (`PHASES`, their ``loading`` sum and the ``total``) of each fresh
    process, and their median and minimum over all runs but the first (over all when there is
    one): ``{"runs": [...], "median": {...}, "min": {...}}``."""
    runs = []
    for _ in range(repeats):
        started = time.time()
        command = [sys.executable, "-m", "deployment.startup", json.dumps(run_config), str(rank)]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        ended = time.time()
        phases = json.loads(done.stdout.strip().splitlines()[-1])
        phases["interpreter"] = phases.pop("entered") - started
        phases["exit"] = ended - phases.pop("ready")
        phases["loading"] = sum(phases[phase] for phase in LOADING)
        phases["total"] = ended - started
        runs.append(phases)
    steady = runs[1:] or runs
    return {
        "runs": runs,
        "median": {key: statistics.median(run[key] for run in steady) for key in runs[0]},
        "min": {key: min(run[key] for run in steady) for key in runs[0]},
    }


def child(run_config: Mapping[str, str | int | float], rank: int) -> dict[str, float]:
    """Run a node's start-up in this process; seconds per phase."""
    times = {"entered": ENTERED}
    mark = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        times[phase], mark = now - mark, now

    import torch  # noqa: F401

    lap("import torch")
    import peft  # noqa: F401
    import transformers  # noqa: F401

    lap("import transformers, peft")
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

    lap("import flwr")
    import flwr_datasets.partitioner  # noqa: F401  (a node partitions its data for each message)

    import clients.app  # noqa: F401  (what flwr-clientapp imports)
    from clients.node import BASE_RECORD, BASE_VERSION_RECORD, own_base
    from clients.worker import Worker
    from fedlora.config import RunConfig
    from fedlora.models.peft_io import (
        apply_client_state,
        client_state_from_model,
        pretrained_weights,
    )
    from fedlora.wire.messages import VERSION_KEY

    config = RunConfig.from_flower(run_config)
    lap("import the apps")
    worker = Worker(config)
    lap("base model")
    model = worker.lora_model(rank).model
    lap("LoRA injection")
    pretrained = pretrained_weights(model)
    state = RecordDict(
        {
            BASE_RECORD: ArrayRecord({name: 1e-3 * w for name, w in pretrained.items()}),
            BASE_VERSION_RECORD: ConfigRecord({VERSION_KEY: 1}),
        }
    )
    context = Context(run_id=0, node_id=0, node_config={}, state=state, run_config={})
    mark = time.perf_counter()
    client_state = client_state_from_model(model)
    client_state.base_shift = dict(own_base(context, worker.device).shift)
    apply_client_state(model, client_state, pretrained)
    lap("state restore")
    worker.data(0, 3)
    lap("data")
    times["ready"] = time.time()
    return times


ENTERED = time.time()

if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]), int(sys.argv[2]))))
