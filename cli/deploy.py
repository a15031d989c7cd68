"""``fedlora deploy``: set up a real federation of a SuperLink and one SuperNode per device.

``fedlora deploy init DIR --nodes N --host NAME...`` makes the certificates and node keys
(`deployment.credentials`), adds the ``flwr`` CLI's connection to ``$FLWR_HOME/config.toml``
(`deployment.federation`) and prints what to copy to which machine and the exact command each
runs (`deployment.commands`); ``--insecure`` makes no credentials and prints plain-text commands.
``fedlora deploy connect NAME HOST:PORT --root-certificates FILE`` adds the connection on another
operator machine; ``fedlora deploy startup`` measures a node's per-message start-up
(`deployment.startup`).
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from rich.table import Table

from cli.options import add_json, output_console
from deployment.commands import (
    DEFAULT_NODE_PORT,
    DEFAULT_PORT,
    register_command,
    run_command,
    superlink_command,
    supernode_command,
)
from deployment.credentials import (
    DEFAULT_DAYS,
    DEFAULT_HOSTS,
    NODE_PUBLIC_KEY_FILE,
    SUPERLINK_DIR,
    write_credentials,
)
from deployment.federation import add_connection
from deployment.startup import PHASES, measure_startup
from fedlora.errors import ConfigError

DEFAULT_CONNECTION = "fedlora"
EXAMPLE_CAPACITY = {"lora-rank": 8, "batch-size": 16, "device": "cpu"}
"""The capacity a device declares in its node config; each device sets its own."""
DEPLOYMENT_RUN_CONFIG = {"base-changes": "messages"}
"""Run-config keys a deployment needs: nodes cannot read the server's run directory."""


def add_deploy_commands(deploy: argparse.ArgumentParser) -> None:
    actions = deploy.add_subparsers(title="commands", metavar="COMMAND", required=True)

    init = actions.add_parser(
        "init",
        help="certificates, node keys, the flwr connection, and the commands for every machine",
        description=(
            "Write a CA, the SuperLink's TLS certificate for the hosts given and an ECDSA key "
            "pair per SuperNode into DIR (one folder per machine); add connection NAME to "
            "$FLWR_HOME/config.toml; print what to copy where and the command each machine runs."
        ),
    )
    init.add_argument("dir", type=Path, metavar="DIR", help="a new folder for the credentials")
    init.add_argument("--nodes", type=int, required=True, metavar="N", help="SuperNodes (devices)")
    init.add_argument(
        "--host",
        nargs="+",
        default=list(DEFAULT_HOSTS),
        metavar="NAME",
        help="the SuperLink's host names or IP addresses, the first one used to connect "
        f"(default: {' '.join(DEFAULT_HOSTS)})",
    )
    init.add_argument("--port", type=int, default=DEFAULT_PORT, help="the SuperLink's port")
    init.add_argument(
        "--connection", default=DEFAULT_CONNECTION, metavar="NAME", help="the flwr connection name"
    )
    init.add_argument("--days", type=int, default=DEFAULT_DAYS, help="certificate validity")
    init.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS and no node authentication (a trusted network only); writes no credentials",
    )
    init.set_defaults(handler=run_init)

    connect = actions.add_parser(
        "connect",
        help="add a SuperLink connection to $FLWR_HOME/config.toml",
        description="Add connection NAME to ADDRESS for `flwr run . NAME` on this machine.",
    )
    connect.add_argument("name", metavar="NAME")
    connect.add_argument("address", metavar="HOST:PORT")
    security = connect.add_mutually_exclusive_group(required=True)
    security.add_argument("--root-certificates", type=Path, metavar="FILE", help="the CA (ca.pem)")
    security.add_argument("--insecure", action="store_true", help="no TLS")
    connect.set_defaults(handler=run_connect)

    startup = actions.add_parser(
        "startup",
        help="per-message start-up of a node's ClientApp process, by phase",
        description=(
            "Start REPEATS fresh Python processes one after another, each doing what a node does "
            "for a message before it trains: imports, base model, LoRA injection, restoring its "
            "drifted base from the node state, data. The first pays cold caches; the median of "
            "the others is the steady per-message cost."
        ),
    )
    startup.add_argument("--model", default="minilm", help="run-config model (default: minilm)")
    startup.add_argument("--rank", type=int, default=8, help="the node's LoRA rank (default: 8)")
    startup.add_argument("--repeats", type=int, default=5, help="fresh processes (default: 5)")
    add_json(startup)
    startup.set_defaults(handler=run_startup)


COMMANDS = {"deploy": add_deploy_commands}


def run_init(args: argparse.Namespace) -> int:
    if args.nodes < 1:
        raise ConfigError(f"--nodes must be >= 1, got {args.nodes}")
    address = f"{args.host[0]}:{args.port}"
    if args.insecure:
        config_file = add_connection(args.connection, address, None)
        print_instructions(args, None, config_file)
        return 0
    files = write_credentials(args.dir, args.nodes, args.host, args.days)
    config_file = add_connection(args.connection, address, files.ca)
    print_instructions(args, files.root, config_file)
    return 0


def run_connect(args: argparse.Namespace) -> int:
    config_file = add_connection(args.name, args.address, args.root_certificates)
    print(f"connection {args.name!r} to {args.address} written to {config_file}")
    return 0


def run_startup(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {args.repeats}")
    run_config = {"model": args.model, "partitioner": "iid", "num-threads": 1}
    result = measure_startup(run_config, args.rank, args.repeats)
    table = Table(title=f"per-message start-up, {args.model} rank {args.rank} (seconds)")
    table.add_column("phase")
    labels = [str(i + 1) for i in range(len(result["runs"]))]
    for label in (*labels, "median 2..", "min 2.."):
        table.add_column(label, justify="right")
    runs = [*result["runs"], result["median"], result["min"]]
    for phase in (*PHASES, "loading", "total"):
        table.add_row(phase, *(f"{run[phase]:.3f}" for run in runs))
    output_console().print(table)
    if args.json:
        args.json.write_text(json.dumps({"run_config": run_config, **result}, indent=2))
    return 0


def print_instructions(args: argparse.Namespace, root: Path | None, config_file: Path) -> None:
    """What to copy to which machine, and the command each one runs."""
    address = f"{args.host[0]}:{args.port}"
    secure = root is not None
    if secure:
        print(f"Credentials written to {root}: copy each folder to its machine.\n")
    else:
        print("INSECURE: no TLS, no node authentication; use on a trusted network only.\n")
    superlink_folder = Path(SUPERLINK_DIR) if secure else None
    copy = f" (copy {root / SUPERLINK_DIR}/ there first)" if secure else ""
    print(f"On the server {args.host[0]}{copy}, with fedlora installed:")
    print(f"  {shlex.join(superlink_command(superlink_folder, args.port))}")
    print(
        "  (--disable-runtime-dependency-installation: the SuperLink would otherwise uv-sync the "
        "app's dependencies, torch included, into a fresh environment for every run)\n"
    )
    print(f"On this machine (the flwr CLI): connection {args.connection!r} -> {address} added to")
    print(f"  {config_file}")
    if secure:
        print("Register every node's public key (once, with the SuperLink running):")
        for index in range(args.nodes):
            public_key = root / f"node-{index}" / NODE_PUBLIC_KEY_FILE
            print(f"  {shlex.join(register_command(public_key, args.connection))}")
    print()
    for index in range(args.nodes):
        node = f"node-{index}"
        copy = f" (copy {root / node}/ there first)" if secure else ""
        node_config = {"partition-id": index, "num-partitions": args.nodes, **EXAMPLE_CAPACITY}
        command = supernode_command(
            Path(node) if secure else None, address, node_config, DEFAULT_NODE_PORT
        )
        print(f"On device {index}{copy}:")
        print(f"  {shlex.join(command)}")
    print(
        "\nEach device states its capacity in --node-config: lora-rank, batch-size, device "
        "(cpu, cuda, cuda:N), and partition-id/num-partitions or its own data-path."
    )
    print("\nThen, from the project folder on this machine:")
    print(f"  {shlex.join(run_command(args.connection, DEPLOYMENT_RUN_CONFIG))}")
