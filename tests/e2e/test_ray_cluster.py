"""A simulation attached to an existing Ray cluster: ``ray start --head`` and a second node joining
it, both on this machine, each in a user and mount namespace of its own where a tmpfs covers the
run directory, so that their workers find it empty, as workers on other machines would. FedEx-LoRA
with ``base-changes = "messages"`` runs its ClientApps on both nodes, ends with the rows of a run
on a Ray of its own, and the cluster outlives the run. The cluster's workers partition the data
themselves (they import flwr-datasets); those of the run on its own Ray read the run's shared
splits and never do (`fedlora.data.shared_splits`). Only the processes the test started are
stopped (tagged in their environment: `tests.support.processes`)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
from flwr.clientapp import ClientApp

from clients.app import client_app
from simulations import runner
from simulations.recipe_files import RECIPES_DIR
from simulations.recipes import load_recipe, resolve
from simulations.run_dir import read_metrics
from simulations.runner import simulate
from tests.support.processes import BIN, Processes, free_port

pytestmark = pytest.mark.slow

TINY = RECIPES_DIR / "tiny.toml"
NAMESPACE = ("unshare", "--user", "--map-root-user", "--mount")
"""A user namespace (root in it maps to this user) that may mount in a mount namespace of its own."""
COVER_AND_RUN = 'mount -t tmpfs tmpfs "$0" && exec "$@"'
"""``sh -c`` script: a tmpfs over the directory ``$0``, then the command that follows."""
START_TIMEOUT = 120
SAME_ROWS = ("round", "accuracy", "loss", "relative_deviation", "bytes_up", "bytes_down", "clients")


@dataclass(frozen=True)
class Cluster:
    address: str
    run_dir: Path
    """The run directory, covered by an empty tmpfs on both nodes."""


def namespace_refusal(folder: Path) -> str:
    """Why a tmpfs cannot be mounted in a user and mount namespace here ("" when it can)."""
    if shutil.which(NAMESPACE[0]) is None:
        return "unshare is not installed"
    point = folder / "probe"
    point.mkdir()
    result = subprocess.run(
        [*NAMESPACE, "mount", "-t", "tmpfs", "tmpfs", str(point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode == 0:
        return ""
    return result.stderr.strip() or f"status {result.returncode}"


def start_node(processes: Processes, covered: Path, temp_dir: Path, *options: str) -> None:
    """``ray start`` in a namespace of its own where a tmpfs covers ``covered``: the node's
    processes (and the workers they start) stay there after the command returns."""
    command = [
        *NAMESPACE,
        *("sh", "-c", COVER_AND_RUN, str(covered)),
        *(str(BIN / "ray"), "start", *options),
        "--num-cpus=1",
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}",
        f"--dashboard-agent-listen-port={free_port()}",
        "--object-store-memory=100000000",  # 100 MB of shared memory: the messages are small
        "--disable-usage-stats",
    ]
    result = processes.run(command, timeout=START_TIMEOUT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def cluster(tmp_path) -> Iterator[Cluster]:
    """A head and a second node, one CPU each; every process they started is killed after."""
    refusal = namespace_refusal(tmp_path)
    if refusal:
        pytest.skip(f"no user and mount namespaces here: {refusal}")
    run_dir = tmp_path / "cluster-run"
    run_dir.mkdir()
    ray_dir = Path(tempfile.mkdtemp(prefix="ray-"))  # short: Ray's socket paths have a limit
    processes = Processes(tmp_path, tmp_path / "flwr")
    port = free_port()
    address = f"127.0.0.1:{port}"
    try:
        start_node(
            processes,
            run_dir,
            ray_dir / "head",
            "--head",
            f"--port={port}",
            f"--ray-client-server-port={free_port()}",
            "--include-dashboard=false",
        )
        start_node(processes, run_dir, ray_dir / "node", f"--address={address}")
        yield Cluster(address, run_dir)
    finally:
        processes.stop()
        shutil.rmtree(ray_dir, ignore_errors=True)


def observing_client_app(seen: Path):
    """`runner.client_app`'s stand-in: the project's ClientApp, which notes, for each message,
    the Ray node it runs on, what it finds in the run directory and whether its process has
    imported flwr-datasets (one JSON line in ``seen/<pid>.jsonl``, a folder outside the run
    directory)."""
    seen.mkdir()

    def make(run_config) -> ClientApp:
        real, run_dir = client_app(run_config), str(run_config["run-dir"])
        app = ClientApp()

        def observed(message, context):
            reply = real(message, context)
            note = {
                "node": ray.get_runtime_context().get_node_id(),
                "run_dir": os.listdir(run_dir),
                "partitioned": "flwr_datasets" in sys.modules,
            }
            with (seen / f"{os.getpid()}.jsonl").open("a") as file:
                file.write(json.dumps(note) + "\n")
            return reply

        for handler in (app.query, app.train, app.evaluate):
            handler()(observed)
        return app

    return make


def notes(seen: Path) -> list[dict]:
    return [json.loads(line) for path in seen.glob("*.jsonl") for line in path.open()]


def alive_nodes(address: str) -> set[str]:
    """The ids of the cluster's live nodes, asked by a driver that connects and leaves."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\.")
        ray.init(address=address, logging_level="error", log_to_driver=False)
    try:
        return {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    finally:
        ray.shutdown()


def test_a_run_on_a_two_node_cluster_that_cannot_see_the_run_directory(
    cluster, tmp_path, monkeypatch
):
    recipe = resolve(load_recipe(TINY), {"base-changes": "messages"}, strategy="fedex", rounds=2)
    on_cluster = dataclasses.replace(  # one ClientApp on each node's one CPU
        recipe,
        simulation=dataclasses.replace(recipe.simulation, ray_address=cluster.address, num_cpus=1),
    )
    monkeypatch.setattr(runner, "client_app", observing_client_app(tmp_path / "seen-cluster"))
    rows = read_metrics(simulate(on_cluster, out_dir=cluster.run_dir))

    nodes = alive_nodes(cluster.address)  # Flower's ray.shutdown() left the cluster up
    assert len(nodes) == 2
    on_nodes = notes(tmp_path / "seen-cluster")
    assert {note["node"] for note in on_nodes} == nodes  # both nodes ran ClientApps
    assert all(note["run_dir"] == [] for note in on_nodes)
    assert any(note["partitioned"] for note in on_nodes)  # no shared splits to read there
    written = set(os.listdir(cluster.run_dir))
    assert {"config.toml", "metrics.jsonl", "status", "export", "splits"} <= written
    assert not {"base", "nodes"} & written  # the base changes and node state never hit a disk
    assert [row["round"] for row in rows] == [1, 2]
    assert all(row["relative_deviation"] < 1e-5 for row in rows)  # exact through the messages

    monkeypatch.setattr(runner, "client_app", observing_client_app(tmp_path / "seen-local"))
    local_rows = read_metrics(simulate(recipe, out_dir=tmp_path / "local"))
    on_own_ray = notes(tmp_path / "seen-local")
    assert on_own_ray and not {note["node"] for note in on_own_ray} & nodes
    assert all("config.toml" in note["run_dir"] for note in on_own_ray)
    assert not any(note["partitioned"] for note in on_own_ray)  # they read the shared splits
    for row, local in zip(rows, local_rows, strict=True):
        assert {key: row[key] for key in SAME_ROWS} == {key: local[key] for key in SAME_ROWS}
