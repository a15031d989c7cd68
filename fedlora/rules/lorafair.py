"""LoRA-FAIR: FedAvg's factors, then a server-side correction of B towards the ideal direction.

The server averages the folded factors as FedAvg does, (U, V) = (sum_i p_i sqrt(s_i) B_i, sum_i p_i
sqrt(s_i) A_i), then corrects U (the folded B) by dB minimising

    1 - cos((U + dB) V, T) + lam ||dB||_F^2,   T = W_{t-1} + dW*   (the ideal next global product),

with Adam from dB = 0 (Bian et al., "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and
Initialization Refinement"; correcting B beat correcting A or both). Clients start the next round from
the slices of (U + dB, V): the "initialisation refinement". Not exact: only the direction is fitted.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from fedlora.errors import ConfigError
from fedlora.lowrank import LowRank, frobenius_norm, stack
from fedlora.rules.base import ideal_update
from fedlora.rules.fedavg import FedAvg
from fedlora.updates import ClientUpdate


class LoRAFAIR(FedAvg):
    """LoRA-FAIR's correction of FedAvg's B.

    Parameters
    ----------
    steps : int, default 200
        Adam iterations from dB = 0. The best iterate per module (by objective) is kept, so the cosine
        to the target is never worse than FedAvg's.
    lam : float, default 0.01
        Weight of the penalty lam ||dB||_F^2 (on the folded B).
    lr : float, default 0.01
        Adam's learning rate relative to the rms of FedAvg's folded B: Adam runs on dB / rms(U), so
        each step moves an entry of B by about lr * rms(U). A module whose U or target is zero keeps
        FedAvg's factors (its cosine is undefined).
    """

    name = "lorafair"
    exact = False

    def __init__(self, steps: int = 200, lam: float = 0.01, lr: float = 0.01):
        if steps < 0 or lam < 0 or lr <= 0:
            raise ConfigError(
                f"LoRA-FAIR needs steps >= 0, lam >= 0 and lr > 0; got {steps}, {lam}, {lr}"
            )
        self.steps, self.lam, self.lr = steps, lam, lr

    def _average_factors(self, state, updates, weights) -> dict:
        averaged = super()._average_factors(state, updates, weights)
        targets = {
            module: ideal_next_product(state.factors[module], updates, weights, module)
            for module in averaged
        }
        return corrected_factors(averaged, targets, self.steps, self.lam, self.lr)


def ideal_next_product(
    previous: LowRank, updates: list[ClientUpdate], weights: Tensor, module: str
) -> LowRank:
    """T = W_{t-1} + dW*: the previous global product plus the ideal update, as stacked factors."""
    return stack([previous, ideal_update(previous, updates, weights, module)])


def corrected_factors(
    averaged: dict[str, LowRank], targets: dict[str, LowRank], steps: int, lam: float, lr: float
) -> dict[str, LowRank]:
    """(U + dB, V) per module; modules whose U has the same shape are solved in one batch."""
    target_norms = {module: frobenius_norm(target) for module, target in targets.items()}
    groups: dict[tuple, list[str]] = defaultdict(list)
    for module, factors in averaged.items():
        if solvable(factors, target_norms[module]):
            U = factors.U
            groups[(tuple(U.shape), U.dtype, U.device)].append(module)
    corrected = dict(averaged)
    for modules in groups.values():
        corrections = solve_batch(
            [averaged[m] for m in modules],
            [targets[m] for m in modules],
            torch.stack([target_norms[m] for m in modules]),
            steps,
            lam,
            lr,
        )
        for module, dB in zip(modules, corrections):
            corrected[module] = LowRank(averaged[module].U + dB, averaged[module].V)
    return corrected


def solvable(factors: LowRank, target_norm: Tensor) -> bool:
    """The cosine is defined and the step size is not zero: U != 0 and T != 0."""
    return bool(factors.U.abs().max() > 0) and bool(target_norm > 0)


def solve_batch(
    factors: list[LowRank],
    targets: list[LowRank],
    target_norm: Tensor,
    steps: int,
    lam: float,
    lr: float,
) -> Tensor:
    """The best dB per module from one Adam run over the stacked (M, d_out, r) corrections.

    The objectives are summed; Adam is elementwise, so the modules stay independent.
    """
    U = torch.stack([f.U for f in factors]).detach()
    projected = torch.stack([t.U @ (t.V @ f.V.T) for f, t in zip(factors, targets)]).detach()
    gram = torch.stack([f.V @ f.V.T for f in factors]).detach()
    step_scale = U.pow(2).mean(dim=(1, 2)).sqrt()[:, None, None]
    with torch.enable_grad():
        Z = torch.zeros_like(U, requires_grad=True)
        optimizer = torch.optim.Adam([Z], lr=lr)

        def objective() -> Tensor:
            return fair_objective(U, step_scale * Z, projected, gram, target_norm, lam)

        value = objective()
        best_value, best_Z = value.detach(), Z.detach().clone()
        for _ in range(steps):
            optimizer.zero_grad()
            value.sum().backward()
            optimizer.step()
            value = objective()
            improved = value.detach() < best_value
            best_Z[improved] = Z.detach()[improved]
            best_value = torch.where(improved, value.detach(), best_value)
    return step_scale * best_Z


def fair_objective(
    U: Tensor, dB: Tensor, projected: Tensor, gram: Tensor, target_norm: Tensor, lam: float
) -> Tensor:
    """1 - cos((U + dB) V, T) + lam ||dB||^2 per module, from factors only.

    <(U + dB) V, P Q> = <U + dB, P (Q V^T)> (``projected``) and ||(U + dB) V||^2 =
    <(U + dB) (V V^T), U + dB> (``gram`` = V V^T).
    """
    X = U + dB
    inner = torch.sum(X * projected, dim=(1, 2))
    squared = torch.sum((X @ gram) * X, dim=(1, 2)).clamp_min(torch.finfo(X.dtype).tiny)
    cosine = inner / (squared.sqrt() * target_norm)
    return 1 - cosine + lam * torch.sum(dB * dB, dim=(1, 2))
