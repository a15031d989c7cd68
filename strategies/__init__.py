"""Flower Message-API strategies, one per federated LoRA method; `STRATEGIES` gives each method's
strategy by its name in `fedlora.rules.RULES` (`strategy_class`).

The package's names (`strategies.registry`) load on first use, so that importing the package
alone imports neither torch nor peft: Flower imports it in every ``flwr run`` to check the app's
``strategies.server_app:app`` reference. It loads fedlora's bytecode cache first
(`fedlora.bytecode_cache`)."""

import importlib

from fedlora.bytecode_cache import use_bytecode_cache

use_bytecode_cache()  # before torch: hosts whose torch ships no bytecode


def __getattr__(name: str):
    registry = importlib.import_module("strategies.registry")
    if name not in registry.__all__:
        raise AttributeError(f"module 'strategies' has no attribute {name!r}")
    return getattr(registry, name)
