"""``flwr run`` of the project root, as docs/deployment.md gives it: Flower's own CLI starts a local
SuperLink in simulation mode and runs the project's ServerApp and ClientApp from
``[tool.flwr.app]`` in ``pyproject.toml``. The local SuperLink that ``flwr run`` leaves running
is stopped by the test (it inherits the test's process tag)."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations.run_dir import read_metrics
from tests.support.processes import Processes

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[2]


def test_flwr_run_of_the_project_root(tmp_path):
    processes = Processes(tmp_path, tmp_path / "flwr-home")
    processes.env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    run_dir = tmp_path / "run"
    run_config = (
        f"model='tiny-bert' num-server-rounds=2 max-length=32 local-steps=1 run-dir='{run_dir}'"
    )
    # Two CPUs a ClientApp: one Ray worker (one import of torch) on two cores, for clients that
    # train in milliseconds.
    command = [
        *("flwr", "run", str(PROJECT), "--stream", "--run-config", run_config),
        *("--federation-config", "num-supernodes=3 client-resources-num-cpus=2"),
    ]
    try:
        done = processes.run(command, timeout=600)
    finally:
        processes.stop()

    rows = read_metrics(run_dir)
    assert [row["round"] for row in rows] == [1, 2], done.stdout[-3000:] + done.stderr[-3000:]
    assert all(row["strategy"] == "fedex" and row["clients"] == 3 for row in rows)
    assert all(row["relative_deviation"] < 1e-5 for row in rows)
    assert (run_dir / "export" / "config.json").exists()
    stream = done.stdout + done.stderr
    assert stream.count("[ROUND 2/2]") == 1  # each line once
    metrics = [line for line in stream.splitlines() if "Server metrics, round 2:" in line]
    assert len(metrics) == 1 and f"accuracy={rows[-1]['accuracy']:.4g}," in metrics[0]
