"""The ``flwr`` CLI's connection to a SuperLink: ``[superlink.NAME]`` in ``$FLWR_HOME/config.toml``
(default ``~/.flwr``), where Flower 1.42 reads the connection of ``flwr run . NAME`` and
``flwr supernode register KEY NAME`` (not from ``pyproject.toml``). Written with Flower's own
config writer, so other connections in the file are kept."""

from __future__ import annotations

from pathlib import Path

from flwr.cli.constant import FLOWER_CONFIG_FILE
from flwr.cli.flower_config import write_superlink_connection
from flwr.cli.typing import SuperLinkConnection
from flwr.supercore.utils import get_flwr_home

from fedlora.errors import ConfigError


def add_connection(name: str, address: str, root_certificates: Path | None) -> Path:
    """Add (or replace) connection ``name`` to ``address`` (host:port), verifying the SuperLink's
    certificate with ``root_certificates`` (None: insecure, no TLS); return the config file."""
    if root_certificates is not None and not root_certificates.is_file():
        raise ConfigError(f"root certificates {str(root_certificates)!r} is not a file")
    connection = SuperLinkConnection(
        name=name,
        address=address,
        root_certificates=None if root_certificates is None else str(root_certificates.resolve()),
        insecure=True if root_certificates is None else None,
    )
    write_superlink_connection(connection)
    return get_flwr_home() / FLOWER_CONFIG_FILE
