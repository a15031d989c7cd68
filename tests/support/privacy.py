"""The tiny sample-level DP federation's settings, and epsilon from a fresh Opacus accountant."""

from __future__ import annotations

from opacus.accountants import create_accountant

from fedlora.config import kebab

TINY_FIELDS = {
    "model": "tiny-bert",
    "partitioner": "iid",
    "max_length": 16,
    "batch_size": 8,
    "local_steps": 2,
    "learning_rate": 0.01,
    "lora_rank": 4,
}
TINY = {kebab(name): value for name, value in TINY_FIELDS.items()}


def fresh_epsilon(kind: str, noise: float, rate: float, steps: int, delta: float) -> float:
    accountant = create_accountant(kind)
    accountant.history = [(noise, rate, steps)]
    return accountant.get_epsilon(delta=delta)
