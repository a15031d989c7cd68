"""Flower Message-API strategies, one per federated LoRA method; `STRATEGIES` gives each method's
strategy by its name in `fedlora.rules.RULES` (`strategy_class`).

The package's names (`strategies.registry`) load on first use, so that importing the package
alone imports neither torch nor peft: Flower imports it in every ``flwr run`` to check the app's
``strategies.server_app:app`` reference."""

import importlib


def __getattr__(name: str):
    registry = importlib.import_module("strategies.registry")
    if name not in registry.__all__:
        raise AttributeError(f"module 'strategies' has no attribute {name!r}")
    return getattr(registry, name)
