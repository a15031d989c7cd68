"""Versioned base weights for the methods that change them (FedEx-LoRA, FLoRA).

The global model W_t carries its round t. The server keeps each round's change (as factors), so a
client whose copy of the base is at version v catches up with the changes of rounds v+1..t; once
those factors outgrow the dense matrices the older rounds are summed into one dense snapshot, and a
client older than the snapshot receives the whole W_t - W_0 instead. On the
client side one `BaseCache` holds W_v - W_0 once per worker (or per device), not once per client.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedlora.errors import InvalidUpdateError
from fedlora.lora.lowrank import LowRank, stack


@dataclass
class ChangeLog:
    """The per-round changes of the global weights since a dense snapshot.

    ``snapshot`` is W_s - W_0 per module (dense) at version ``snapshot_version`` = s;
    ``rounds[i]`` is the change of round s + i + 1, as factors. `appended` sums all rounds but the
    newest into the snapshot once their factors hold more numbers than the dense matrices, so the
    log never holds much more than twice the dense base change however many rounds pass.
    """

    rounds: list[dict[str, LowRank]] = field(default_factory=list)
    snapshot: dict[str, Tensor] = field(default_factory=dict)
    snapshot_version: int = 0

    @property
    def version(self) -> int:
        return self.snapshot_version + len(self.rounds)

    @property
    def latest(self) -> dict[str, LowRank]:
        """The change of the newest round."""
        return self.rounds[-1]

    def appended(self, change: dict[str, LowRank]) -> ChangeLog:
        """A new log with ``change`` as the next round's, the older rounds summed into the
        snapshot where that is smaller."""
        rounds = [*self.rounds, change]
        older = rounds[:-1]
        factor_numel = sum(delta.numel() for past in older for delta in past.values())
        dense_numel = sum(delta.shape[0] * delta.shape[1] for delta in change.values())
        if not older or factor_numel <= dense_numel:
            return ChangeLog(rounds, self.snapshot, self.snapshot_version)
        snapshot = {module: self.total_of(older, module).dense() for module in change}
        return ChangeLog([change], snapshot, self.version)

    def total(self, module: str) -> LowRank:
        """W_t - W_0 of ``module``: the snapshot and every later round's change."""
        return self.total_of(self.rounds, module)

    def total_of(self, rounds: list[dict[str, LowRank]], module: str) -> LowRank:
        terms = [change[module] for change in rounds]
        if module in self.snapshot:
            terms.insert(0, dense_factors(self.snapshot[module]))
        return stack(terms)

    def since(self, version: int) -> tuple[int, dict[str, LowRank]]:
        """The change that brings a base at ``version`` to the current one, and the version it
        starts from: the rounds version+1..t (empty when up to date), or, for a version older than
        the snapshot, the whole W_t - W_0 from version 0 (which replaces the base's shift)."""
        if not 0 <= version <= self.version:
            raise InvalidUpdateError(
                f"no base version {version}: the global model is at version {self.version}"
            )
        if version < self.snapshot_version:
            return 0, {module: self.total(module) for module in self.snapshot}
        pending = self.rounds[version - self.snapshot_version :]
        if not pending:
            return version, {}
        modules = pending[0]
        return version, {
            module: stack([change[module] for change in pending]) for module in modules
        }


def dense_factors(matrix: Tensor) -> LowRank:
    """A dense matrix as factors, the identity on its smaller side."""
    d_out, d_in = matrix.shape
    if d_out <= d_in:
        return LowRank(torch.eye(d_out, dtype=matrix.dtype, device=matrix.device), matrix)
    return LowRank(matrix, torch.eye(d_in, dtype=matrix.dtype, device=matrix.device))


@dataclass
class BaseCache:
    """W_v - W_0 per module at one version v: the drifted base that all clients of a worker share,
    kept on ``device`` (None: where its changes come from)."""

    version: int = 0
    shift: dict[str, Tensor] = field(default_factory=dict)
    device: torch.device | None = None

    def catch_up(self, change: dict[str, Tensor], from_version: int, to_version: int) -> None:
        """Add the change of rounds from_version+1..to_version; a cache already at to_version (another
        client of this worker caught it up) ignores it; a change from version 0 (the whole W_t - W_0)
        replaces the shift; any other change that does not start here is refused."""
        if to_version == self.version:
            return
        if from_version == 0:
            self.shift, self.version = {}, 0
        if from_version != self.version:
            raise InvalidUpdateError(
                f"base change starts at version {from_version} but this cache holds version {self.version}"
            )
        for module, delta in change.items():
            delta = delta if self.device is None else delta.to(self.device)
            current = self.shift.get(module)
            self.shift[module] = (
                delta.clone() if current is None else current + delta.to(current.dtype)
            )
        self.version = to_version

    def shift_of(self, module: str, like: Tensor) -> Tensor:
        current = self.shift.get(module)
        return torch.zeros_like(like) if current is None else current


def accumulated_changes(state, module: str) -> LowRank:
    """W_t - W_0 of a drifting-base state: the snapshot and every later change stacked."""
    if state.changes.version:
        return state.changes.total(module)
    d_out, d_in = state.shapes[module]
    return LowRank(torch.zeros(d_out, 0), torch.zeros(0, d_in))
