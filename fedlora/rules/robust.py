"""Robust aggregation: norm bounding of each client's change, and coordinate-wise robust
combinations of padded folded factors.

Norm bounding. Client i's change dW_i = s_i (B_i A_i - B_i0 A_i0) has its Frobenius norm computed
from the factors' Gram matrices (`client_change_norms_per_client`, never dense). Its bound is the
smaller of ``norm_bound`` and ``norm_median_multiple`` times the round's median client norm (a zero
option is off); a client above it is shrunk towards its start by c_i = bound / ||dW_i||:

- LoRA factors from a zero product (FLoRA): B_i' = c_i B_i, so dW_i' = c_i dW_i exactly;
- LoRA factors from the global slices: B_i' = B_i0 + c_i (B_i - B_i0), A_i' likewise, with c_i
  chosen so that the product's change c_i L + c_i^2 Q (first- and second-order parts) has norm
  at most the bound (`bounded_lora`);
- FedSA-LoRA's A (B stays on the client, so the server bounds ||sqrt(s_i) (A_i - A_i0)||_F);
- Fed-SB's R: R_i' = R_{t-1} + c_i (R_i - R_{t-1}), exact since B R A is linear in R.

Robust combinations replace sum_i w_i pad(X_i) by the coordinate-wise median or trimmed mean over
the clients that cover the coordinate (those whose rank exceeds its row), unweighted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import pairwise

import torch
from torch import Tensor

from fedlora.config import ROBUST_AGGREGATIONS
from fedlora.errors import ConfigError
from fedlora.lora.adapter import LoRAFactors, SBCore, SharedA
from fedlora.lora.lowrank import LowRank, frobenius_norm
from fedlora.lora.updates import ClientUpdate

COMBINATIONS = ROBUST_AGGREGATIONS


@dataclass(frozen=True)
class Robustness:
    """A rule's robust options (all off by default).

    Parameters
    ----------
    norm_bound : float, default 0
        Fixed bound on each client's ||dW_i||_F per module (0: off).
    norm_median_multiple : float, default 0
        Bound at this multiple of the round's median client norm per module (0: off).
    combination : str, default "mean"
        "mean" (the rule's own), "trimmed-mean" or "median" of the padded folded factors.
    trim_fraction : float, default 0.1
        Trimmed mean: the fraction of covering clients dropped at each end, per coordinate.
    """

    norm_bound: float = 0.0
    norm_median_multiple: float = 0.0
    combination: str = "mean"
    trim_fraction: float = 0.1

    def __post_init__(self) -> None:
        for name in ("norm_bound", "norm_median_multiple"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:
                raise ConfigError(f"robust-{name.replace('_', '-')} must be >= 0 and finite")
        if self.combination not in COMBINATIONS:
            raise ConfigError(
                f"robust-aggregation = {self.combination!r}: choose one of {list(COMBINATIONS)}"
            )
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"robust-trim-fraction must be in [0, 0.5), got {self.trim_fraction}")

    @property
    def bounds_norms(self) -> bool:
        return self.norm_bound > 0 or self.norm_median_multiple > 0

    def bound(self, norms: Tensor) -> float:
        """The round's bound for these client norms (inf when off)."""
        bounds = [math.inf]
        if self.norm_bound > 0:
            bounds.append(self.norm_bound)
        if self.norm_median_multiple > 0:
            bounds.append(self.norm_median_multiple * float(norms.median()))
        return min(bounds)

    def shrink_factors(self, norms: Tensor) -> Tensor:
        """c_i = min(1, bound / ||dW_i||) per client, for changes linear in what is scaled."""
        bound = self.bound(norms)
        return torch.where(norms > bound, bound / norms.clamp_min(1e-300), 1.0).to(norms)


def bounded_lora(
    update: ClientUpdate, module: str, start: LowRank | None, norm: float, bound: float
) -> LoRAFactors:
    """Client i's factors shrunk towards its start so that ||dW_i'||_F <= bound.

    From a zero product (FLoRA) B_i' = c B_i with c = bound / ||dW_i|| (exact). From the global
    slices (U_0, V_0 folded), both factors' changes are scaled by c, so the product's change is
    c L + c^2 Q with L = dU V_0 + U_0 dV and Q = dU dV; c is the root of c ||L|| + c^2 ||Q|| = bound,
    which bounds the norm by the triangle inequality (and is within c^2 ||Q|| of it).
    """
    factors = update.modules[module]
    if norm <= bound:
        return factors
    if start is None:
        return replace(factors, B=factors.B * (bound / norm))
    rank, root = factors.rank, math.sqrt(factors.scale)
    U0, V0 = start.U[:, :rank].to(factors.B), start.V[:rank].to(factors.A)
    dU, dV = factors.B * root - U0, factors.A * root - V0
    linear = float(frobenius_norm(LowRank(torch.cat([dU, U0], 1), torch.cat([V0, dV]))))
    quadratic = float(frobenius_norm(LowRank(dU, dV)))
    shrink = 2 * bound / (linear + math.sqrt(linear**2 + 4 * quadratic * bound))
    return replace(factors, A=(V0 + shrink * dV) / root, B=(U0 + shrink * dU) / root)


def shared_a_norms(updates: Sequence[ClientUpdate], start: LowRank, module: str) -> Tensor:
    """||sqrt(s_i) (A_i - A_i0)||_F per client (FedSA-LoRA: the server never sees B_i)."""
    norms = []
    for update in updates:
        shared: SharedA = update.modules[module]
        start_rows = start.V[: shared.rank] / math.sqrt(shared.scale)
        norms.append(math.sqrt(shared.scale) * torch.linalg.matrix_norm(shared.A - start_rows))
    return torch.stack(norms).double()


def bounded_shared_a(shared: SharedA, start: LowRank, shrink: float) -> SharedA:
    if shrink >= 1:
        return shared
    A0 = start.V[: shared.rank] / math.sqrt(shared.scale)
    return replace(shared, A=A0 + shrink * (shared.A - A0))


def bounded_core(core: SBCore, previous: Tensor, shrink: float) -> SBCore:
    if shrink >= 1:
        return core
    return replace(core, R=previous + shrink * (core.R - previous))


def with_modules(update: ClientUpdate, modules: dict) -> ClientUpdate:
    return replace(update, modules={**update.modules, **modules})


def robust_padded_rows(rows: Sequence[Tensor], rank: int, combination: str, trim: float) -> Tensor:
    """Coordinate-wise median or trimmed mean of clients' (r_i x d) rows, padded to (rank x d):
    row k combines only the clients with r_i > k (rows no client covers stay zero)."""
    out = rows[0].new_zeros(rank, rows[0].shape[1])
    ranks = [r.shape[0] for r in rows]
    edges = sorted({0, *ranks})
    for low, high in pairwise(edges):
        covering = torch.stack([r[low:high] for r in rows if r.shape[0] >= high])
        out[low:high] = robust_combine(covering, combination, trim)
    return out


def robust_combine(values: Tensor, combination: str, trim: float) -> Tensor:
    """Median (the lower one for an even count) or trimmed mean over the first axis."""
    if combination == "median":
        return values.median(dim=0).values
    count = values.shape[0]
    cut = min(int(trim * count), (count - 1) // 2)
    ordered = values.sort(dim=0).values
    return ordered[cut : count - cut].mean(dim=0)
