"""What `fedlora deploy init` prints: what to copy to which machine and the exact command each
one runs (`deployment.commands`), with each node's rank, port and state directory."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from deployment.commands import (
    DEFAULT_NODE_PORT,
    PRIVATE_HOST,
    gateway_command,
    register_command,
    run_command,
    superlink_command,
    supernode_command,
    tunnel_command,
)
from deployment.credentials import NODE_PUBLIC_KEY_FILE, SUPERLINK_DIR
from fedlora.errors import ConfigError

DEFAULT_RANK = 8
EXAMPLE_CAPACITY = {"batch-size": 16, "device": "cpu"}
"""The capacity a device declares in its node config besides its rank; each device sets its own."""
NODE_STATE_DIR = "state"
"""A node's store (`clients.node_store`) in its folder: what it keeps survives its restarts."""
DEPLOYMENT_RUN_CONFIG = {"base-changes": "messages", "round-timeout": 600.0}
"""Run-config keys a deployment needs: nodes cannot read the server's run directory, and a round
waits at most 10 minutes for a node that died."""
RUNS_FOLDER = "runs/flwr"
"""Where the ServerApp writes a run without ``run-dir``: under its working folder, the one the
SuperLink was started from."""


def node_ranks(num_nodes: int, ranks: list[int]) -> list[int]:
    """Each node's LoRA rank from ``--ranks``: one per node, or one for all."""
    if len(ranks) not in (1, num_nodes) or min(ranks) < 1:
        raise ConfigError(
            f"--ranks takes one rank >= 1 per node ({num_nodes}) or one for all, got {ranks}"
        )
    return ranks * num_nodes if len(ranks) == 1 else list(ranks)


def print_instructions(args: argparse.Namespace, root: Path | None, config_file: Path) -> None:
    """What to copy to which machine, and the command each one runs."""
    server, secure = args.host[0], root is not None
    public = f"{server}:{args.port}"
    private = f"{PRIVATE_HOST}:{args.private_port}"
    if secure:
        print(f"Credentials written to {root}: copy each folder to its machine.\n")
    else:
        print("INSECURE: no TLS, no node authentication; use on a trusted network only.\n")
    superlink_folder = Path(SUPERLINK_DIR) if secure else None
    copy = f"copy {root / SUPERLINK_DIR}/ into a folder there; " if secure else ""
    print(f"On the server {server} ({copy}from that folder, with fedlora installed):")
    print(f"  {shlex.join(superlink_command(superlink_folder, args.private_port))}")
    print(f"  {shlex.join(gateway_command(superlink_folder, f'0.0.0.0:{args.port}', private))}")
    print(
        f"  The SuperLink serves its Control API on {private} only; the gateway passes only the "
        f"Fleet API on from the public port {args.port}. Its state (registered keys, runs) is "
        "kept in the --database file across restarts. --disable-runtime-dependency-installation: "
        "the SuperLink would otherwise uv-sync the app's dependencies, torch included, for "
        "every run.\n"
    )
    print("On this machine (the flwr CLI), keep a tunnel to the SuperLink's Control API open:")
    print(f"  {shlex.join(tunnel_command(server, args.private_port))}")
    print(f"  connection {args.connection!r} -> {private} added to {config_file}")
    if secure:
        print("Register every node's public key (once, with the SuperLink running):")
        for index in range(args.nodes):
            public_key = root / f"node-{index}" / NODE_PUBLIC_KEY_FILE
            print(f"  {shlex.join(register_command(public_key, args.connection))}")
    print()
    for index, rank in enumerate(node_ranks(args.nodes, args.ranks)):
        node = f"node-{index}"
        copy = f"copy {root / node}/ into a folder there; " if secure else ""
        node_config = {
            "partition-id": index,
            "num-partitions": args.nodes,
            "lora-rank": rank,
            **EXAMPLE_CAPACITY,
            "state-dir": f"{node}/{NODE_STATE_DIR}",
        }
        folder = Path(node) if secure else None
        command = supernode_command(folder, public, node_config, DEFAULT_NODE_PORT + index)
        print(f"On device {index} ({copy}from that folder):")
        print(f"  {shlex.join(command)}")
    print(
        "\nEach device states its capacity in --node-config: lora-rank, batch-size, device "
        "(cpu, cuda, cuda:N), and partition-id/num-partitions or its own data-path; state-dir "
        "keeps its state (base version, FedSA's B, DP accountant) across restarts."
    )
    print("\nThen, from the project folder on this machine:")
    print(f"  {shlex.join(run_command(args.connection, DEPLOYMENT_RUN_CONFIG))}")
    resume = {**DEPLOYMENT_RUN_CONFIG, "run-dir": f"{RUNS_FOLDER}/RUN_ID", "resume": True}
    print(
        f"Results: {RUNS_FOLDER}/<Flower run id> in the server's folder above. A run that "
        "stopped (SuperLink or ServerApp restarted) goes on from its checkpoint as a new run:"
    )
    print(f"  {shlex.join(run_command(args.connection, resume))}")
