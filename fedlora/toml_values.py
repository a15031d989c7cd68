"""Run-config values as TOML text: how recipes, command lines and the key reference write them."""

from __future__ import annotations

import json
from collections.abc import Mapping

from fedlora.config import Scalar


def toml_table(table: Mapping[str, Scalar]) -> str:
    """``key = value`` lines of a TOML table."""
    return "".join(f"{key} = {toml_scalar(value)}\n" for key, value in table.items())


def toml_scalar(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)
