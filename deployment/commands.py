"""The exact Flower commands of a deployment, as argument lists: `fedlora deploy init` prints them
and the tests run them, so what the README and the CLI show is what is tested.

Secure by default: the SuperLink serves TLS with the CA-signed certificate on a private address
(127.0.0.1) and admits only registered SuperNode keys; the Fleet gateway (`deployment.gateway`)
is the one public address; ``folder=None`` gives the plain-text commands instead.
Every SuperLink runs with ``--disable-runtime-dependency-installation``: otherwise it would
``uv sync`` the app's dependencies (torch included: gigabytes) into a fresh environment for every
run, which is slow, differs from the environment that was tested, and fails offline. The machines
install fedlora once (``pip install fedlora``) and every run uses that installation.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from deployment.credentials import (
    CA_FILE,
    LOOPBACK,
    NODE_KEY_FILE,
    SERVER_CERT_FILE,
    SERVER_KEY_FILE,
)
from fedlora.toml_values import toml_scalar

DEFAULT_PORT = 9092
"""The public port: the Fleet gateway, the only address that SuperNodes (and strangers) reach."""
PRIVATE_HOST = LOOPBACK
DEFAULT_PRIVATE_PORT = 9093
"""The SuperLink's own port (Fleet, Control and Runtime APIs) on `PRIVATE_HOST`; operators reach
it through an SSH tunnel."""
DEFAULT_NODE_PORT = 9094
"""The first SuperNode's own runtime port; node i takes ``DEFAULT_NODE_PORT + i`` so that several
nodes can share a machine."""
DATABASE_FILE = "state.db"
"""The SuperLink's state (registered node keys, runs) in its folder, so that it survives a restart."""
NodeConfig = Mapping[str, str | int | float | bool]


def superlink_command(
    folder: Path | None,
    port: int = DEFAULT_PRIVATE_PORT,
    host: str = PRIVATE_HOST,
    database: Path | None = None,
) -> list[str]:
    """``flower-superlink`` serving all its APIs on ``host:port`` (a private address: the
    gateway serves the public one), its state in ``database`` (default: `DATABASE_FILE` in
    ``folder``); ``folder`` holds ``ca.pem``, ``server.pem`` and ``server.key`` (None:
    insecure, no node authentication)."""
    command = ["flower-superlink", "--host", host, "--port", str(port)]
    if folder is None:
        command.append("--insecure")
    else:
        command += [
            "--ssl-ca-certfile",
            str(folder / CA_FILE),
            "--ssl-certfile",
            str(folder / SERVER_CERT_FILE),
            "--ssl-keyfile",
            str(folder / SERVER_KEY_FILE),
            "--enable-supernode-auth",
        ]
    if database is None:
        database = Path(DATABASE_FILE) if folder is None else folder / DATABASE_FILE
    command += ["--database", str(database)]
    return [*command, "--disable-runtime-dependency-installation"]


def gateway_command(folder: Path | None, listen: str, superlink: str) -> list[str]:
    """``fedlora deploy gateway``: the public ``listen`` address (host:port) passing the Fleet API
    on to the SuperLink at ``superlink``, with the SuperLink's certificate from ``folder``
    (None: insecure, plain HTTP)."""
    command = ["fedlora", "deploy", "gateway", listen, superlink]
    if folder is None:
        return [*command, "--insecure"]
    return [
        *command,
        *("--certfile", str(folder / SERVER_CERT_FILE)),
        *("--keyfile", str(folder / SERVER_KEY_FILE)),
        *("--root-certificates", str(folder / CA_FILE)),
    ]


def tunnel_command(server: str, port: int = DEFAULT_PRIVATE_PORT) -> list[str]:
    """``ssh`` forwarding this machine's ``127.0.0.1:port`` to the SuperLink's private port on
    ``server``: the operators' path to the Control API."""
    return ["ssh", "-N", "-L", f"{port}:{PRIVATE_HOST}:{port}", server]


def supernode_command(
    folder: Path | None,
    superlink: str,
    node_config: NodeConfig,
    port: int = DEFAULT_NODE_PORT,
) -> list[str]:
    """``flower-supernode`` connecting to ``superlink`` (host:port) with ``node_config``;
    ``folder`` holds the node's ``ca.pem`` and ``node.key`` (None: insecure)."""
    command = ["flower-supernode", "--superlink", superlink, "--port", str(port)]
    if folder is None:
        command.append("--insecure")
    else:
        command += [
            "--root-certificates",
            str(folder / CA_FILE),
            "--auth-supernode-private-key",
            str(folder / NODE_KEY_FILE),
        ]
    return [*command, "--node-config", node_config_text(node_config)]


def register_command(public_key: Path, connection: str) -> list[str]:
    """``flwr supernode register``: admit the node holding the private half of ``public_key``."""
    return ["flwr", "supernode", "register", str(public_key), connection]


def run_command(connection: str, run_config: NodeConfig, app: str = ".") -> list[str]:
    """``flwr run APP`` (the project folder) on ``connection``, streaming the log, with run-config
    overrides."""
    command = ["flwr", "run", app, connection, "--stream"]
    if run_config:
        command += ["--run-config", node_config_text(run_config)]
    return command


def node_config_text(values: NodeConfig) -> str:
    """``key=value`` pairs as Flower parses them (TOML values: strings quoted)."""
    return " ".join(f"{key}={toml_scalar(value)}" for key, value in values.items())
