"""A simulation stopped by Ctrl-C exits within seconds leaving a resumable run marked
interrupted; a simulation killed with SIGKILL (every process of it, Ray's too) during a round;
either, resumed with ``fedlora simulate --resume``, ends as the same run uninterrupted: the same
metrics rows (timings aside), bitwise the same final checkpoint and node stores, and for
FedEx-LoRA the same exported model (CPU, one thread per client, seeds per round and partition:
nothing is left to chance). The uninterrupted run is the in-process engine's, in the test's own
process: the engines give the same run bit for bit."""

from __future__ import annotations

import json
import signal
import sys
import time

import pytest
from safetensors.torch import load_file

from clients.node_store import NODES_DIR
from simulations.recipe_files import RECIPES_DIR
from simulations.recipes import load_recipe
from simulations.run_dir import read_metrics
from simulations.runner import simulate
from strategies.checkpoint import TENSORS_FILE, checkpoint_dir, checkpoint_rounds
from strategies.run_record import FINISHED, read_manifest, read_status
from tests.support.processes import Processes, wait_for
from tests.support.timing import TIMING
from tests.support.tiny_runs import on_in_process_engine

pytestmark = pytest.mark.slow

TINY = RECIPES_DIR / "tiny.toml"
ROUNDS = 3
RUN_SECONDS = 240
KILL_WINDOW = "local-steps=20"
"""Rounds long enough (for both runs alike) that the kill lands before the next round ends."""
POLL_SECONDS = 0.02


def simulate_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", "simulate", *args]


def rows_of(run_dir) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_metrics(run_dir)]


def tensors_of(path) -> dict:
    return load_file(str(path))


def same_tensors(left: dict, right: dict) -> bool:
    return left.keys() == right.keys() and all(left[k].equal(right[k]) for k in left)


def node_snapshots(run_dir) -> dict:
    """Each node's newest snapshot, by partition id."""
    snapshots = {}
    for node in sorted((run_dir / NODES_DIR).iterdir()):
        newest = max(node.glob("round-*.safetensors"), key=lambda p: int(p.stem[6:]))
        snapshots[node.name] = (newest.name, tensors_of(newest))
    return snapshots


def has_node_snapshot(run_dir, server_round: int) -> bool:
    return any((run_dir / NODES_DIR).glob(f"*/round-{server_round}.safetensors"))


@pytest.mark.parametrize(
    ("strategy", "stopped_by"),
    [("fedex", "SIGKILL during round 2"), ("fedsa", "Ctrl-C after round 2's checkpoint")],
)
def test_a_stopped_simulation_resumes_to_the_uninterrupted_run(strategy, stopped_by, tmp_path):
    processes = Processes(tmp_path, tmp_path / "flwr-home")
    overrides = ["seed=3", KILL_WINDOW]
    args = [str(TINY), "--rounds", str(ROUNDS), "--strategy", strategy, *overrides]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    try:
        simulate(
            on_in_process_engine(load_recipe(TINY)),
            overrides,
            out_dir=whole,
            strategy=strategy,
            rounds=ROUNDS,
        )
        process = processes.start("killed", simulate_command(*args, "--out", str(killed)))
        if stopped_by.startswith("SIGKILL"):
            wait_for(
                lambda: len(read_metrics(killed)) == 1 and has_node_snapshot(killed, 2),
                "a node to finish its round-2 training",
                RUN_SECONDS,
                POLL_SECONDS,
            )
            processes.kill("killed")
            assert read_status(killed) == "running"  # nothing could mark it
        else:
            wait_for(
                lambda: 2 in checkpoint_rounds(killed),
                "round 2's checkpoint",
                RUN_SECONDS,
                POLL_SECONDS,
            )
            check_ctrl_c_stops(process, processes, killed)
        resumed = processes.run(simulate_command("--resume", str(killed)), RUN_SECONDS)
        assert resumed.returncode == 0, resumed.stderr
    finally:
        processes.stop()
    assert read_status(killed) == FINISHED
    assert len(read_manifest(killed)["runs"]) == 2
    assert rows_of(killed) == rows_of(whole)
    assert [row["round"] for row in rows_of(killed)] == [1, 2, 3]
    final = checkpoint_dir(killed, ROUNDS) / TENSORS_FILE
    assert same_tensors(tensors_of(final), tensors_of(checkpoint_dir(whole, ROUNDS) / TENSORS_FILE))
    killed_nodes, whole_nodes = node_snapshots(killed), node_snapshots(whole)
    assert killed_nodes.keys() == whole_nodes.keys()
    for partition, (name, tensors) in killed_nodes.items():
        assert name == whole_nodes[partition][0]
        assert same_tensors(tensors, whole_nodes[partition][1])
    if strategy == "fedex":
        exported = tensors_of(killed / "export" / "model.safetensors")
        assert same_tensors(exported, tensors_of(whole / "export" / "model.safetensors"))
    assert json.loads((killed / "metrics.jsonl").read_text().splitlines()[-1])["round"] == 3


def check_ctrl_c_stops(process, processes: Processes, run_dir) -> None:
    """SIGINT (Ctrl-C): the command exits within 10 s with status 130 and no traceback, naming
    the resume command; the run is marked interrupted."""
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    process.wait(timeout=30)
    seconds = time.monotonic() - started
    assert process.returncode == 130
    assert seconds < 10, seconds
    output = processes.log("killed")
    assert "Traceback" not in output and "fedlora simulate --resume" in output
    assert read_status(run_dir) == "interrupted"
