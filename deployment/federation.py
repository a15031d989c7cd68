"""The ``flwr`` CLI's connection to a SuperLink: ``[superlink.NAME]`` in ``$FLWR_HOME/config.toml``
(default ``~/.flwr``), where Flower 1.42 reads the connection of ``flwr run . NAME`` and
``flwr supernode register KEY NAME`` (not from ``pyproject.toml``). Written with Flower's own
config writer, so other connections in the file are kept."""

from __future__ import annotations

from pathlib import Path

from flwr.cli.constant import FLOWER_CONFIG_FILE
from flwr.cli.flower_config import read_flower_config, write_superlink_connection
from flwr.cli.typing import SuperLinkConnection
from flwr.supercore.utils import get_flwr_home

from fedlora.errors import ConfigError


def add_connection(
    name: str, address: str, root_certificates: Path | None, force: bool = False
) -> Path:
    """Add (or replace) connection ``name`` to ``address`` (host:port), verifying the SuperLink's
    certificate with ``root_certificates`` (None: insecure, no TLS); return the config file.
    An insecure connection does not replace a secure one unless ``force``."""
    if root_certificates is not None and not root_certificates.is_file():
        raise ConfigError(f"root certificates {str(root_certificates)!r} is not a file")
    if root_certificates is None and not force and is_secure(name):
        raise ConfigError(
            f"connection {name!r} in {get_flwr_home() / FLOWER_CONFIG_FILE} uses TLS; an "
            "insecure one would replace it: choose another --connection name, or pass --force"
        )
    connection = SuperLinkConnection(
        name=name,
        address=address,
        root_certificates=None if root_certificates is None else str(root_certificates.resolve()),
        insecure=True if root_certificates is None else None,
    )
    write_superlink_connection(connection)
    return get_flwr_home() / FLOWER_CONFIG_FILE


def is_secure(name: str) -> bool:
    """Whether connection ``name`` exists and is not insecure."""
    config, _ = read_flower_config()
    connection = config.get("superlink", {}).get(name)
    return isinstance(connection, dict) and not connection.get("insecure", False)
