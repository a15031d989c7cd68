"""`simulations.shared_ray`: the Ray instance that the runs of one command share outlives each
run's disconnect and stops with the command (the runs on it: ``test_cli_on_ray``'s compare and
``test_dp_sweep_on_ray``); a child that prints no address in time, or exits without, is an error
that names it, the child stopped."""

from __future__ import annotations

import dataclasses
import signal
import socket
import subprocess
import sys

import pytest

from fedlora.errors import SimulationError
from simulations import recipes
from simulations import shared_ray as shared_ray_module
from simulations.recipe_files import RECIPES_DIR
from simulations.recipes import load_recipe
from simulations.shared_ray import shared_ray

SETTINGS = load_recipe(RECIPES_DIR / "tiny.toml").simulation
JOIN_AND_LEAVE = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="error", log_to_driver=False)
print(int(ray.cluster_resources()["CPU"]))
ray.shutdown()
"""


def joined(address: str) -> str:
    """What a run that joins ``address`` and disconnects (as Flower's backend does) sees."""
    command = [sys.executable, "-c", JOIN_AND_LEAVE, address]
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=120).stdout


def accepts_connections(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as probe:
        probe.settimeout(2)
        return probe.connect_ex((host, int(port))) == 0


@pytest.mark.slow
def test_runs_join_one_instance_that_stops_with_the_command(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with shared_ray(SETTINGS, runs=2) as address:
        assert accepts_connections(address)
        first, second = joined(address), joined(address)  # the first disconnect stops nothing
        assert first == second and int(first) >= 1
    assert not accepts_connections(address)


@pytest.mark.parametrize(
    "change",
    [{"engine": "in-process"}, {"ray_address": "127.0.0.1:6379"}],
    ids=["in-process", "cluster"],
)
def test_no_instance_is_started_where_the_runs_use_none_of_their_own(change, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with shared_ray(dataclasses.replace(SETTINGS, **change), runs=3) as address:
        assert address == ""
    with shared_ray(SETTINGS, runs=1) as address:
        assert address == ""
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    with shared_ray(SETTINGS, runs=3) as address:
        assert address == ""


@pytest.mark.parametrize(
    ("child", "error", "returncode"),
    [
        (
            "import time; time.sleep(600)",
            r"printed no address within 1 s .* was stopped",
            -signal.SIGKILL,
        ),
        ("import sys; sys.exit(3)", r"did not start \(exit status 3\)", 3),
    ],
    ids=["silent", "exits"],
)
def test_a_child_without_an_address_is_an_error_and_is_stopped(
    child, error, returncode, monkeypatch
):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(shared_ray_module, "HEAD", child)
    monkeypatch.setattr(recipes, "machine_cpus", lambda: 2)  # Ray's count may start processes
    started = []

    class Recorded(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(shared_ray_module.subprocess, "Popen", Recorded)
    with (
        pytest.raises(SimulationError, match=error),
        shared_ray(SETTINGS, runs=2, start_seconds=1),
    ):
        pytest.fail("no address, no runs")
    (head,) = started
    assert head.returncode == returncode
