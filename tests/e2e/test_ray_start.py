"""The run's Ray (`simulations.ray_start`): its workers have imported the ClientApp's modules
before their first task, and it is shut down after the run; a Ray the caller started is used as
it is and left running."""

import sys

import pytest
import ray

from simulations.ray_start import ray_for_run

pytestmark = pytest.mark.slow

INIT_ARGS = {"address": "local", "logging_level": "error", "log_to_driver": False, "num_cpus": 1}


@ray.remote
def imported_before_the_task() -> bool:
    return "clients.app" in sys.modules and "peft" in sys.modules


# Ray's tip about its GPU environment variable in future versions, on the first task's start (the
# runner silences it in runs: `simulations.runner.quiet_run`).
@pytest.mark.filterwarnings("ignore:Tip. In future versions of Ray:FutureWarning")
def test_the_runs_workers_import_the_client_app_as_they_start():
    with ray_for_run(INIT_ARGS):
        assert ray.get(imported_before_the_task.remote(), timeout=300)
    assert not ray.is_initialized()


def test_a_ray_the_caller_started_is_used_as_it_is():
    ray.init(include_dashboard=False, **INIT_ARGS)
    try:
        job = ray.get_runtime_context().get_job_id()
        with ray_for_run(INIT_ARGS):
            assert ray.get_runtime_context().get_job_id() == job
        assert ray.is_initialized()
    finally:
        ray.shutdown()
