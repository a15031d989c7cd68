"""LoRA-FAIR: FedAvg's factors, then a server-side correction of B towards the ideal direction.

The server averages the folded factors as FedAvg does, (U, V) = (sum_i p_i sqrt(s_i) B_i, sum_i p_i
sqrt(s_i) A_i), then corrects U (the folded B) by dB minimising

    1 - cos((U + dB) V, T) + lam ||dB||_F^2,   T = W_{t-1} + dW*   (the ideal next global product),

with Adam from dB = 0, run in the span of U and T V^T where the solution lies (Bian et al., "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and
Initialization Refinement"; correcting B beat correcting A or both). Clients start the next round from
the slices of (U + dB, V): the "initialisation refinement". Not exact: only the direction is fitted.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor

from fedlora.errors import ConfigError
from fedlora.lora.lowrank import LowRank, frobenius_norm, stack
from fedlora.lora.updates import ClientUpdate
from fedlora.rules.base import ideal_update
from fedlora.rules.fedavg import FedAvg
from fedlora.rules.robust import Robustness


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
        Adam's learning rate relative to the size of FedAvg's folded B: each step moves dB by about
        lr ||U||_F in Frobenius norm (see `solve_batch`). A module whose U or target is zero keeps
        FedAvg's factors (its cosine is undefined).
    """

    name = "lorafair"
    takes_server_optimizer = False
    exact = False
    combinations = ("mean",)
    client_dp_refusal = (
        "its server-side correction fits B to the sum of the clients' products B_i A_i"
    )

    def __init__(
        self,
        steps: int = 200,
        lam: float = 0.01,
        lr: float = 0.01,
        robustness: Robustness | None = None,
    ):
        super().__init__(robustness)
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
    groups: dict[tuple, list[str]] = defaultdict(list)
    for module, factors in averaged.items():
        U = factors.U
        groups[(tuple(U.shape), U.dtype, U.device)].append(module)
    corrected = dict(averaged)
    for modules in groups.values():
        corrections = solve_batch(
            [averaged[m] for m in modules], [targets[m] for m in modules], steps, lam, lr
        )
        for module, dB in zip(modules, corrections):
            corrected[module] = LowRank(averaged[module].U + dB, averaged[module].V)
    return corrected


ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def solve_batch(
    factors: list[LowRank], targets: list[LowRank], steps: int, lam: float, lr: float
) -> Tensor:
    """The best dB per module from one Adam run over the stacked corrections, in a reduced space.

    The objective's gradient, b (U + dB) G - a P + 2 lam dB with G = V V^T and P = T V^T, never leaves
    the column space of [U, P] (right-multiplying by G keeps columns), so from dB = 0 the solution
    is dB = Q C with Q an orthonormal basis of [U, P] (d_out x 2r, `orthonormal_coordinates`) and C
    (2r x r): every inner product keeps its value in C's coordinates, and Adam runs on (M, 2r, r)
    coefficients instead of (M, d_out, r) entries. Adam (torch's defaults: betas 0.9, 0.999, eps 1e-8, bias-corrected) on
    C / rms(Q^T U), with the gradient in closed form and no host synchronisation; modules stay
    independent. A module whose U or target is zero has no defined cosine and keeps dB = 0.
    """
    U = torch.stack([f.U for f in factors])
    projected = torch.stack([t.U @ (t.V @ f.V.T) for f, t in zip(factors, targets)])
    gram = torch.stack([f.V @ f.V.T for f in factors])
    target_norm = torch.stack([frobenius_norm(t) for t in targets])
    spanning = torch.cat([U, projected], dim=-1)
    gram_of_span = spanning.mT @ spanning
    to_coordinates = orthonormal_coordinates(gram_of_span)
    rank = U.shape[-1]
    U_coordinates = to_coordinates.mT @ gram_of_span[..., :rank]
    projected_coordinates = to_coordinates.mT @ gram_of_span[..., rank:]
    step_scale = U_coordinates.pow(2).mean(dim=(1, 2)).sqrt()
    solvable = (step_scale > 0) & (target_norm > 0)
    target_norm = torch.where(solvable, target_norm, torch.ones_like(target_norm))
    scale = step_scale[:, None, None]

    Z = torch.zeros_like(U_coordinates)
    first, second = torch.zeros_like(Z), torch.zeros_like(Z)
    best_value = torch.full_like(target_norm, math.inf)
    best_Z = Z
    (beta1, beta2) = ADAM_BETAS
    for step in range(1, steps + 2):
        value, gradient = objective_and_gradient(
            U_coordinates, scale, Z, projected_coordinates, gram, target_norm, lam
        )
        improved = value < best_value
        best_Z = torch.where(improved[:, None, None], Z, best_Z)
        best_value = torch.where(improved, value, best_value)
        if step > steps:
            break
        first.mul_(beta1).add_(gradient, alpha=1 - beta1)
        second.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
        denominator = (second / (1 - beta2**step)).sqrt_().add_(ADAM_EPS)
        Z = Z - (lr / (1 - beta1**step)) * first / denominator
    dB = spanning @ (to_coordinates @ (scale * best_Z))
    return torch.where(solvable[:, None, None], dB, torch.zeros_like(U))


def orthonormal_coordinates(gram: Tensor) -> Tensor:
    """T such that Q = Y T is an orthonormal basis of the span of Y's columns (batched), from the
    eigendecomposition of their Gram matrix Y^T Y in float64: T = W diag(lambda^-1/2), with the
    directions the columns lack (lambda below 1e-12 of the largest) given zero columns."""
    eigenvalues, eigenvectors = torch.linalg.eigh(gram.double())
    floor = 1e-12 * eigenvalues.amax(dim=-1, keepdim=True)
    inverse_root = torch.where(eigenvalues > floor, eigenvalues.clamp_min(1e-300).rsqrt(), 0.0)
    return (eigenvectors * inverse_root[..., None, :]).to(gram.dtype)


def objective_and_gradient(
    U: Tensor,
    scale: Tensor,
    Z: Tensor,
    projected: Tensor,
    gram: Tensor,
    target_norm: Tensor,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """The objective at dB = scale Z per module, and its gradient in Z:
    d(1 - cos)/dX = -P / (n ||T||) + <X, P> X G / (n^3 ||T||) with X = U + dB, n = sqrt(<X G, X>)."""
    dB = scale * Z
    X = U + dB
    XG = X @ gram
    norm = torch.sum(XG * X, dim=(1, 2)).clamp_min(torch.finfo(X.dtype).tiny).sqrt()
    inner = torch.sum(X * projected, dim=(1, 2))
    value = 1 - inner / (norm * target_norm) + lam * torch.sum(dB * dB, dim=(1, 2))
    a = (1 / (norm * target_norm))[:, None, None]
    b = (inner / (norm.pow(3) * target_norm))[:, None, None]
    return value, scale * (b * XG - a * projected) + 2 * lam * scale * dB
