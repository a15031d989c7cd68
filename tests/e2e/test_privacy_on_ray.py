"""Sample-level DP in Flower's simulation engine on Ray: ``max-epsilon`` stops a client whose budget
is spent and the run goes on with the others."""

from __future__ import annotations

import json
import math

import pytest

from fedlora.config import RunConfig
from fedlora.data import partitioning
from simulations.runner import simulate
from tests.support.privacy import TINY, fresh_epsilon

pytestmark = pytest.mark.slow


def test_max_epsilon_stops_a_client_and_the_run_goes_on(tmp_path):
    """Ray simulation, Dirichlet(0.3) over 3 nodes: the smallest client (largest sample rate)
    passes max-epsilon in round 2 and stops; the others train all 3 rounds."""
    overrides = {
        "strategy": "fedavg",
        "partitioner": "dirichlet",
        "num-server-rounds": 3,
        "local-steps": 2,
        "batch-size": 8,
        "dp-sample": True,
    }
    config = RunConfig.from_flower({**TINY, **overrides})
    sizes = [len(partitioning.client_data(config, pid, 3).train) for pid in range(3)]
    small = sizes.index(min(sizes))

    def epsilon(pid: int, rounds: int) -> float:
        n = sizes[pid]
        return fresh_epsilon("rdp", 1.0, 1 / math.ceil(n / 8), 2 * rounds, min(1e-5, 1 / n))

    cap = (epsilon(small, 1) + epsilon(small, 2)) / 2
    assert max(epsilon(pid, 3) for pid in range(3) if pid != small) < cap
    run_dir = simulate(
        "simulations/recipes/tiny.toml", {**overrides, "max-epsilon": cap}, tmp_path / "run"
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["clients"] for row in rows] == [3, 2, 2]
    assert [row["dp_stopped"] for row in rows] == [0, 1, 1]
    assert all(row["accuracy"] is not None for row in rows)
    spent = [row["epsilon"][str(small)] for row in rows]
    assert spent == pytest.approx([epsilon(small, 1)] * 3, abs=1e-6)
    assert max(row["epsilon_max"] for row in rows) <= cap
