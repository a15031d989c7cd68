"""``fedlora deploy``: set up a real federation of a SuperLink and one SuperNode per device.

``fedlora deploy init DIR --nodes N --host NAME...`` makes the certificates and node keys
(`deployment.credentials`), adds the ``flwr`` CLI's connection to ``$FLWR_HOME/config.toml``
(`deployment.federation`) and prints what to copy to which machine and the exact command each
runs (`deployment.instructions`); ``--insecure`` makes no credentials and prints plain-text commands.
``fedlora deploy connect NAME HOST:PORT --root-certificates FILE`` adds the connection on another
operator machine; ``fedlora deploy gateway LISTEN SUPERLINK`` serves the public address, the Fleet
API only (`deployment.gateway`); ``fedlora deploy startup`` measures a node's per-message start-up
(`deployment.startup`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.table import Table

from cli.options import add_json, output_console
from deployment.commands import DEFAULT_PORT, DEFAULT_PRIVATE_PORT, PRIVATE_HOST
from deployment.credentials import DEFAULT_DAYS, DEFAULT_HOSTS, write_credentials
from deployment.federation import add_connection
from deployment.gateway import serve_gateway
from deployment.instructions import DEFAULT_RANK, node_ranks, print_instructions
from deployment.startup import PHASES, measure_startup
from fedlora.errors import ConfigError

DEFAULT_CONNECTION = "fedlora"


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
    init.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="the public port (the Fleet gateway's)"
    )
    init.add_argument(
        "--private-port",
        type=int,
        default=DEFAULT_PRIVATE_PORT,
        help=f"the SuperLink's own port on {PRIVATE_HOST} (Control API, for operators)",
    )
    init.add_argument(
        "--ranks",
        type=int,
        nargs="+",
        default=[DEFAULT_RANK],
        metavar="R",
        help=f"each node's LoRA rank, one per node or one for all (default: {DEFAULT_RANK})",
    )
    init.add_argument(
        "--connection", default=DEFAULT_CONNECTION, metavar="NAME", help="the flwr connection name"
    )
    init.add_argument("--days", type=int, default=DEFAULT_DAYS, help="certificate validity")
    init.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS and no node authentication (a trusted network only); writes no credentials",
    )
    init.add_argument(
        "--force",
        action="store_true",
        help="let --insecure replace a secure flwr connection of the same name",
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
    connect.add_argument(
        "--force", action="store_true", help="let --insecure replace a secure connection"
    )
    connect.set_defaults(handler=run_connect)

    gateway = actions.add_parser(
        "gateway",
        help="the public address: pass the Fleet API on to the SuperLink, nothing else",
        description=(
            "Listen on LISTEN (host:port) and forward Fleet API requests to the SuperLink at "
            "SUPERLINK (its private address); answer every other request (Control, Runtime) 404."
        ),
    )
    gateway.add_argument("listen", metavar="LISTEN", help="the public host:port")
    gateway.add_argument("superlink", metavar="SUPERLINK", help="the SuperLink's host:port")
    gateway.add_argument("--certfile", type=Path, help="the SuperLink's TLS certificate")
    gateway.add_argument("--keyfile", type=Path, help="its private key")
    gateway.add_argument("--root-certificates", type=Path, metavar="FILE", help="the CA")
    gateway.add_argument("--insecure", action="store_true", help="plain HTTP on both sides")
    gateway.set_defaults(handler=run_gateway)

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
    node_ranks(args.nodes, args.ranks)
    if args.port == args.private_port:
        raise ConfigError(f"--port and --private-port must differ, both are {args.port}")
    address = f"{PRIVATE_HOST}:{args.private_port}"
    if args.insecure:
        config_file = add_connection(args.connection, address, None, args.force)
        print_instructions(args, None, config_file)
        return 0
    files = write_credentials(args.dir, args.nodes, args.host, args.days)
    config_file = add_connection(args.connection, address, files.ca)
    print_instructions(args, files.root, config_file)
    return 0


def run_connect(args: argparse.Namespace) -> int:
    config_file = add_connection(args.name, args.address, args.root_certificates, args.force)
    print(f"connection {args.name!r} to {args.address} written to {config_file}")
    return 0


def run_gateway(args: argparse.Namespace) -> int:
    tls = (args.certfile, args.keyfile, args.root_certificates)
    if not (all(tls) if not args.insecure else not any(tls)):
        raise ConfigError(
            "gateway: give --certfile, --keyfile and --root-certificates, or --insecure alone"
        )
    serve_gateway(args.listen, args.superlink, *tls)
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
