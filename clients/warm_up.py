"""Ray's worker process setup hook for a simulation's workers (`simulations.ray_start`): each
worker imports the ClientApp's modules (torch, transformers, peft, datasets) as it starts, while
the ServerApp builds its own model, rather than in its first message of round 1. A hook that
raises would end the worker, so a failed import is logged and left to the first message, which
meets and reports it as it would have without the hook."""

from __future__ import annotations

import importlib
import logging

CLIENT_APP_MODULE = "clients.app"

logger = logging.getLogger(__name__)


def warm_up(module: str = CLIENT_APP_MODULE) -> None:
    try:
        importlib.import_module(module)
    except Exception:
        logger.exception("the worker could not import %s ahead of its first message", module)
