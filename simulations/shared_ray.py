"""One Ray instance for the runs of one command (`fedlora compare`, `fedlora dp-sweep`): started
once, in a child process, and joined by every run as a Ray cluster on this machine, so that each
run after the first skips Ray's start. Flower's backend calls `ray.shutdown` after each run, which
only disconnects a run from a Ray it joined; the instance stops when the command ends (the child
stops it when its standard input closes, also when the command is killed).
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from fedlora.errors import SimulationError
from simulations.recipes import SimulationSettings

START_SECONDS = 180.0
"""How long the child may take to start Ray and print its address (minutes on a busy machine)."""
STOP_SECONDS = 60
HEAD = """
import sys, ray
gpus, cpus = int(sys.argv[1]), int(sys.argv[2])
context = ray.init(
    address="local", include_dashboard=False, logging_level="error", log_to_driver=False,
    num_cpus=cpus, **({"num_gpus": gpus} if gpus else {}),
)
print(context.address_info["gcs_address"], flush=True)
sys.stdin.read()
"""
"""The child: a Ray instance of its own (``gpus``: the GPUs it may use, ``cpus``: its CPUs, as a
run's own would have), its address printed, kept until standard input closes."""


@contextmanager
def shared_ray(
    settings: SimulationSettings, runs: int, start_seconds: float = START_SECONDS
) -> Iterator[str]:
    """The address of a Ray instance that ``runs`` runs of ``settings`` share; empty where they
    start none of their own (the in-process engine, a cluster named by ``ray-address`` or
    ``RAY_ADDRESS``) or there is one run only. A child that prints no address within
    ``start_seconds`` is killed and `SimulationError` raised, as for one that exits without."""
    if settings.engine != "ray" or settings.cluster_address() or runs < 2:
        yield ""
        return
    head = subprocess.Popen(
        [sys.executable, "-c", HEAD, str(settings.gpus), str(settings.own_ray_cpus())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        address = first_line(head, start_seconds)
        if address is None:
            head.kill()
            raise SimulationError(
                f"the runs' shared Ray instance printed no address within {start_seconds:g} s "
                "(Ray did not start); its process was stopped"
            )
        if not address:
            raise SimulationError(
                f"the runs' shared Ray instance did not start (exit status {head.wait()})"
            )
        yield address
    finally:
        head.stdin.close()
        try:
            head.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        head.stdout.close()


def first_line(process: subprocess.Popen, seconds: float) -> str | None:
    """The process's first line of standard output, stripped ("" when it closed its output
    first); None when none came within ``seconds``."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(process.stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=seconds).strip()
    except queue.Empty:
        return None
