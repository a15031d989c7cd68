"""Privacy accounting, for both kinds of DP: Opacus' accountant histories, epsilon at a delta,
the history a node carries across rounds as plain values (sample-level DP), and the federation's
accountant (client-level DP)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from fedlora.config import DP_ACCOUNTANTS
from fedlora.errors import ConfigError
from fedlora.privacy.opacus_logging import opacus_module
from fedlora.wire.messages import Scalar

History = list[tuple[float, float, int]]
"""Opacus' accountant history: (noise multiplier, sample rate, steps) entries."""


def new_accountant(mechanism: str):
    """A fresh Opacus accountant of that kind (``rdp`` or ``prv``)."""
    return opacus_module("opacus.accountants").create_accountant(mechanism)


def extended(history: History, noise: float, rate: float, steps: int) -> History:
    """``history`` followed by ``steps`` steps at (noise, rate)."""
    return [*history, (noise, rate, steps)] if steps > 0 else list(history)


def epsilon_of(history: History, delta: float, accountant: str) -> float:
    """Epsilon of a fresh accountant of that kind holding ``history``; 0 for no steps, infinite
    when a step had no noise."""
    if not history:
        return 0.0
    if any(noise == 0 for noise, _, _ in history):
        return math.inf
    fresh = new_accountant(accountant)
    fresh.history = list(history)
    return float(fresh.get_epsilon(delta=delta))


def history_to_values(history: History, accountant: str) -> dict[str, Scalar | list]:
    """The history as plain values (for a Flower ConfigRecord): parallel lists and the kind."""
    return {
        "accountant": accountant,
        "noise-multiplier": [float(noise) for noise, _, _ in history],
        "sample-rate": [float(rate) for _, rate, _ in history],
        "steps": [int(steps) for _, _, steps in history],
    }


def history_from_values(values: Mapping[str, Scalar | list], accountant: str) -> History:
    """The history `history_to_values` wrote (empty for no values); another accountant's is
    refused, since its steps cannot be counted by this one."""
    if not values:
        return []
    if values["accountant"] != accountant:
        raise ConfigError(
            f"dp-accountant = {accountant!r}, but this client's budget so far was counted by "
            f"{values['accountant']!r}; keep the accountant for the whole run"
        )
    return [
        (float(noise), float(rate), int(steps))
        for noise, rate, steps in zip(
            values["noise-multiplier"], values["sample-rate"], values["steps"], strict=True
        )
    ]


class FederationAccountant:
    """The federation's privacy budget: an Opacus accountant (``rdp`` or ``prv``) stepped once
    per private release with its noise multiplier and the fraction of clients sampled for it.

    Opacus analyses Poisson sampling (each client independently with probability q); Flower
    samples exactly n of N clients without replacement. With q = n / N = 1 (every client in every
    round) nothing is amplified and the bound is exact; below 1 the reported epsilon is the
    Poisson-sampling figure at q = n / N, an approximation for fixed-size sampling.
    """

    def __init__(self, mechanism: str = "rdp") -> None:
        if mechanism not in DP_ACCOUNTANTS:
            raise ConfigError(f"accountant {mechanism!r}: choose one of {list(DP_ACCOUNTANTS)}")
        self.mechanism = mechanism
        self.accountant = new_accountant(mechanism)

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        self.accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def state_dict(self) -> dict:
        """The mechanism and Opacus's history (noise multiplier, sample rate, steps), JSON-able,
        so that the budget survives a checkpoint."""
        history = [list(step) for step in self.accountant.state_dict()["history"]]
        return {"mechanism": self.mechanism, "history": history}

    def load_state_dict(self, state: Mapping) -> None:
        """Go on from the history `state_dict` returned (of the same mechanism)."""
        if state["mechanism"] != self.mechanism:
            raise ConfigError(
                f"accountant {self.mechanism!r} cannot go on from a {state['mechanism']!r} history"
            )
        history = [tuple(step) for step in state["history"]]
        self.accountant.load_state_dict({**self.accountant.state_dict(), "history": history})

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0 before any release, inf with no noise)."""
        return epsilon_of(self.accountant.history, delta, self.mechanism)
