"""The run's Ray, started before Flower's engine, which then uses it: each worker process imports
the ClientApp's modules as it starts (`clients.warm_up`, Ray's ``worker_process_setup_hook``),
overlapping the ServerApp's own start. Flower starts Ray the same way, without the hook, when
none is running, and uses one that is (a caller's own, left as it is here too); it calls
`ray.shutdown` after the run, and so does `ray_for_run` after a run that failed before Flower
could."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import ray

WARM_UP_HOOK = "clients.warm_up.warm_up"


@contextmanager
def ray_for_run(init_args: Mapping) -> Iterator[None]:
    """`ray.init` with ``init_args`` (`simulations.recipes.SimulationSettings.backend_config`), the
    workers' setup hook and this process's import path (as Flower passes it); shut down on the
    way out if still up. A Ray already running in this process is left to Flower as it is."""
    if ray.is_initialized():
        yield
        return
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    runtime_env = {
        "env_vars": {"PYTHONPATH": pythonpath},
        "worker_process_setup_hook": WARM_UP_HOOK,
    }
    ray.init(runtime_env=runtime_env, include_dashboard=False, **init_args)
    try:
        yield
    finally:
        if ray.is_initialized():
            ray.shutdown()
