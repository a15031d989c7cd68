"""Client-level DP in Flower's simulation engine on Ray: Fed-SB (its initialisation is one more
release) with three nodes of ranks 2, 4 and 8 (the in-process federations of every DP strategy are
in ``tests/integration/test_client_dp.py``)."""

from __future__ import annotations

import pytest

from tests.support.client_dp_run import RUN, check_client_level_dp
from tests.support.recording_grid import simulate_on_ray

pytestmark = pytest.mark.slow


def test_client_level_dp_on_ray(tmp_path):
    grid = simulate_on_ray({**RUN, "strategy": "fedsb"}, tmp_path, num_nodes=3)
    check_client_level_dp("fedsb", tmp_path, grid)
