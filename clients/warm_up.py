"""Ray's worker process setup hook for a simulation's workers (`simulations.ray_start`): each
worker imports the ClientApp's modules (torch, transformers, peft, datasets) as it starts, while
the ServerApp builds its own model, rather than in its first message of round 1."""

from __future__ import annotations

import importlib

CLIENT_APP_MODULE = "clients.app"


def warm_up() -> None:
    importlib.import_module(CLIENT_APP_MODULE)
