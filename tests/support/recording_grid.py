"""Flower's grid with every message it sends and every reply it receives recorded, exchange by
exchange (as `tests.support.local_grid.LocalGrid` records its own), and a run of the project's
apps in Flower's simulation engine on Ray through it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from clients.app import client_app
from simulations.recipes import SimulationSettings
from simulations.shared_ray import shared_ray
from strategies.server_app import run

RAY_CPUS = 2
RAY_BACKEND = {
    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    "init_args": {"num_cpus": RAY_CPUS, "address": "local"},
}
"""One CPU per ClientApp, two in all: two Ray actors on a 2-core machine, in a Ray of the test's
own (never a cluster found on the machine)."""


class RecordingGrid:
    """Wraps the grid that Flower hands to a ServerApp."""

    def __init__(self, grid) -> None:
        self.grid = grid
        self.sent, self.replies, self.exchanges = [], [], []

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        self.sent.extend(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        self.exchanges.append((messages, replies))
        return replies


@contextmanager
def shared_test_ray() -> Iterator[str]:
    """The address of a Ray of `RAY_CPUS` CPUs that several runs join one after another, as the
    runs of ``fedlora compare`` share one (`simulations.shared_ray`): each skips Ray's start."""
    settings = SimulationSettings(num_supernodes=RAY_CPUS, num_cpus=1)
    with shared_ray(settings, runs=2) as address:
        yield address


def simulate_on_ray(
    config: dict, run_dir: Path, num_nodes: int, ray_address: str = ""
) -> RecordingGrid:
    """Run the project's ServerApp and ClientApp, bound to ``config`` (``run_simulation`` passes
    an empty run config), with ``num_nodes`` nodes on Ray (of the run's own, or the one at
    ``ray_address``, e.g. `shared_test_ray`'s); the grid that recorded the run."""
    recorded = []
    server = ServerApp()

    @server.main()
    def main(grid, context) -> None:
        recorded.append(RecordingGrid(grid))
        run(recorded[0], {**config, "run-dir": str(run_dir)})

    run_simulation(
        server_app=server,
        client_app=client_app(config),
        num_supernodes=num_nodes,
        backend_config=(
            {**RAY_BACKEND, "init_args": {"address": ray_address}} if ray_address else RAY_BACKEND
        ),
    )
    return recorded[0]
