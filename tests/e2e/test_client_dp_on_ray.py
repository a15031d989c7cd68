"""Client-level DP in Flower's simulation engine on Ray: Fed-SB (its initialisation is one more
release) with three nodes of ranks 2, 4 and 8 (the in-process federations of every DP strategy are
in ``tests/integration/test_client_dp.py``)."""

from __future__ import annotations

import pytest
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from clients.app import client_app
from strategies.server_app import run
from tests.support.client_dp_run import RUN, check_client_level_dp
from tests.support.recording_grid import RecordingGrid

pytestmark = pytest.mark.slow

BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}}


def test_client_level_dp_on_ray(tmp_path):
    config = {**RUN, "strategy": "fedsb"}
    recorded = []
    server = ServerApp()

    @server.main()
    def main(grid, context) -> None:
        recorded.append(RecordingGrid(grid))
        run(recorded[0], {**config, "run-dir": str(tmp_path)})

    run_simulation(
        server_app=server, client_app=client_app(config), num_supernodes=3, backend_config=BACKEND
    )
    check_client_level_dp("fedsb", tmp_path, recorded[0])
