"""``docs/config.md``, the reference of every run-config key, generated from the keys' definitions
in `fedlora.config` (``python -m fedlora.config_reference > docs/config.md``)."""

from __future__ import annotations

import dataclasses

from fedlora.config import RunConfig, ServerAppSettings, kebab
from fedlora.rules import RULES
from fedlora.toml_values import toml_scalar

INTRODUCTION = """\
# Configuration keys

Every key of a run's config: a recipe's `[run]` table, a `key=value` override of `fedlora
simulate`, `flwr run --run-config`, or `[tool.flwr.app.config]` in `pyproject.toml`. A key left
out takes its default. An unknown key, a value of another type (an integer passes as a float) or
a value outside what the key allows is refused before anything starts, naming the key.

This file is generated from the keys' definitions (`fedlora/config.py`):
`python -m fedlora.config_reference > docs/config.md`.
"""

SECTIONS = (
    ("Run config", "Read by the ServerApp and every ClientApp.", RunConfig),
    (
        "ServerApp settings",
        (
            "Read by the ServerApp only; `fedlora` commands set `run-dir` and `resume` from "
            "`--out` and `--resume`."
        ),
        ServerAppSettings,
    ),
)
METHOD_CHOICES = {"strategy": tuple(RULES)}
"""The keys whose choices the methods define (`fedlora.method_config` checks them)."""


def config_reference() -> str:
    """The markdown reference: per section, a table of key, type, default, allowed values and
    help text."""
    parts = [INTRODUCTION]
    for title, description, settings in SECTIONS:
        parts.append(f"\n## {title}\n\n{description}\n\n")
        parts.append("| key | type | default | allowed | what it sets |\n|---|---|---|---|---|\n")
        parts.extend(key_row(field) for field in dataclasses.fields(settings))
    return "".join(parts)


def key_row(field: dataclasses.Field) -> str:
    kind = str(field.type).split(" |")[0]
    default = "(follows the model)" if field.default is None else f"`{toml_scalar(field.default)}`"
    choices = METHOD_CHOICES.get(field.name, field.metadata["choices"])
    allowed = field.metadata["range"]
    if choices:
        allowed_text = ", ".join(f"`{choice}`" for choice in choices)
    else:
        allowed_text = allowed.text if allowed is not None else ""
    return f"| `{kebab(field.name)}` | {kind} | {default} | {allowed_text} | {field.metadata['help']} |\n"


if __name__ == "__main__":
    print(config_reference(), end="")
