"""Versioned base weights for the methods that change them (FedEx-LoRA, FLoRA).

The global model W_t carries its round t. The server keeps each round's change (as factors), so a
client whose copy of the base is at version v catches up with the changes of rounds v+1..t. On the
client side one `BaseCache` holds W_v - W_0 once per worker (or per device), not once per client.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedlora.errors import InvalidUpdateError
from fedlora.lowrank import LowRank, stack


@dataclass
class ChangeLog:
    """The per-round changes of the global weights: ``rounds[t - 1]`` is the change of round t."""

    rounds: list[dict[str, LowRank]] = field(default_factory=list)

    @property
    def version(self) -> int:
        return len(self.rounds)

    def append(self, change: dict[str, LowRank]) -> None:
        self.rounds.append(change)

    def since(self, version: int) -> dict[str, LowRank]:
        """The sum of the changes of rounds version+1..t per module (empty when up to date)."""
        if not 0 <= version <= self.version:
            raise InvalidUpdateError(
                f"no base version {version}: the global model is at version {self.version}"
            )
        pending = self.rounds[version:]
        if not pending:
            return {}
        return {module: stack([change[module] for change in pending]) for module in pending[0]}


@dataclass
class BaseCache:
    """W_v - W_0 per module at one version v: the drifted base that all clients of a worker share."""

    version: int = 0
    shift: dict[str, Tensor] = field(default_factory=dict)

    def catch_up(self, change: dict[str, Tensor], from_version: int, to_version: int) -> None:
        """Add the change of rounds from_version+1..to_version; a cache already at to_version (another
        client of this worker caught it up) ignores it; a change that does not start here is refused."""
        if to_version == self.version:
            return
        if from_version != self.version:
            raise InvalidUpdateError(
                f"base change starts at version {from_version} but this cache holds version {self.version}"
            )
        for module, delta in change.items():
            current = self.shift.get(module)
            self.shift[module] = (
                delta.clone() if current is None else current + delta.to(current.dtype)
            )
        self.version = to_version

    def shift_of(self, module: str, like: Tensor) -> Tensor:
        current = self.shift.get(module)
        return torch.zeros_like(like) if current is None else current


def accumulated_changes(state, module: str) -> LowRank:
    """W_t - W_0 of a drifting-base state: every round's change of ``module`` stacked."""
    if state.changes.rounds:
        return stack([change[module] for change in state.changes.rounds])
    d_out, d_in = state.shapes[module]
    return LowRank(torch.zeros(d_out, 0), torch.zeros(0, d_in))
