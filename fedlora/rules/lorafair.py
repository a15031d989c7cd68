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
from collections.abc import Callable, Hashable, Iterable

import torch
from torch import Tensor

from fedlora.errors import ConfigError
from fedlora.lora.lowrank import LowRank, frobenius_norms
from fedlora.lora.updates import ClientUpdate, ClientUpdates, moved_like
from fedlora.rules.base import start_coverage
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
        return corrected_factors(
            averaged, state.factors, updates, weights, self.steps, self.lam, self.lr
        )


def corrected_factors(
    averaged: dict[str, LowRank],
    previous: dict[str, LowRank],
    updates: list[ClientUpdate],
    weights: Tensor,
    steps: int,
    lam: float,
    lr: float,
) -> dict[str, LowRank]:
    """(U + dB, V) per module: dB in one batch per shape of U, what the target gives
    (`target_terms`) in one batch per shape of U and V and clients' rank sum."""
    batch = ClientUpdates.of(updates)

    def solve_key(module: str) -> Hashable:
        U = averaged[module].U
        return (U.shape, U.dtype, U.device)

    def target_key(module: str) -> Hashable:
        return (solve_key(module), averaged[module].V.shape, sum(batch.ranks(module)))

    terms: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    for modules in grouped(averaged, target_key):
        V = torch.stack([averaged[m].V for m in modules])
        target = ideal_next_products([previous[m] for m in modules], batch, weights, modules)
        terms.update(zip(modules, zip(*target_terms(V, *target))))
    corrected = dict(averaged)
    for modules in grouped(averaged, solve_key):
        U = torch.stack([averaged[m].U for m in modules])
        projected, gram, target_norm = (torch.stack(t) for t in zip(*(terms[m] for m in modules)))
        corrections = solve_batch(U, projected, gram, target_norm, steps, lam, lr)
        for module, factors, dB in zip(modules, U, corrections):
            corrected[module] = LowRank(factors + dB, averaged[module].V)
    return corrected


def grouped(modules: Iterable[str], key: Callable[[str], Hashable]) -> list[list[str]]:
    """The modules grouped by ``key``, in the order of first appearance."""
    groups: dict[Hashable, list[str]] = defaultdict(list)
    for module in modules:
        groups[key(module)].append(module)
    return list(groups.values())


def ideal_next_products(
    previous: list[LowRank], updates: ClientUpdates, weights: Tensor, modules: list[str]
) -> tuple[Tensor, Tensor]:
    """T = W_{t-1} + dW* of each module, stacked over the modules as factors of inner rank
    sum_i r_i + r: with (U_0, V_0) the previous folded global factors and c_k the weight of the
    clients that started from their k-th column (`start_coverage`), T = sum_i p_i s_i B_i A_i +
    U_0 diag(1 - c) V_0 = [sqrt(s_i) B_i ... U_0] [p_i sqrt(s_i) A_i; ...; diag(1 - c) V_0]."""
    first = updates.concatenated(modules[0])
    clients_rank, rank = first.U.shape[1], previous[0].inner_rank
    U = first.U.new_empty(len(modules), first.U.shape[0], clients_rank + rank)
    V = first.V.new_empty(len(modules), clients_rank + rank, first.V.shape[1])
    for index, (module, start) in enumerate(zip(modules, previous)):
        c = updates.concatenated(module)
        p = moved_like(weights, c.V)[c.client]
        kept = 1 - moved_like(start_coverage(updates, weights, module, rank), start.V)
        torch.cat([c.U, start.U], dim=1, out=U[index])
        torch.mul(c.V, p[:, None], out=V[index, :clients_rank])
        torch.mul(start.V, kept[:, None], out=V[index, clients_rank:])
    return U, V


def target_terms(V: Tensor, target_U: Tensor, target_V: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """P = T V^T, G = V V^T and ||T||_F (batched over modules), from the factors of T
    (`frobenius_norms` for its norm): T itself is never formed."""
    projected = target_U @ (target_V @ V.mT)
    return projected, V @ V.mT, frobenius_norms(target_U, target_V)


ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def solve_batch(
    U: Tensor,
    projected: Tensor,
    gram: Tensor,
    target_norm: Tensor,
    steps: int,
    lam: float,
    lr: float,
) -> Tensor:
    """The best dB per module (batched: U and P are M x d_out x r) from one Adam run over the
    stacked corrections, in a reduced space.

    The objective's gradient, b (U + dB) G - a P + 2 lam dB with G = V V^T and P = T V^T, never leaves
    the column space of [U, P] (right-multiplying by G keeps columns), so from dB = 0 the solution
    is dB = Q C with Q an orthonormal basis of [U, P] (d_out x 2r, `orthonormal_coordinates`) and C
    (2r x r): every inner product keeps its value in C's coordinates, and Adam runs on (M, 2r, r)
    coefficients instead of (M, d_out, r) entries. Adam (torch's defaults: betas 0.9, 0.999, eps 1e-8,
    bias-corrected; in place, one temporary a step) on C / rms(Q^T U), with the gradient in closed
    form and no host synchronisation, replayed as a CUDA graph on the GPU (`repeat`); modules stay
    independent. A module whose U or target is zero has no defined cosine and keeps dB = 0.
    """
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
    best_Z = Z.clone()
    powers = torch.ones(2, dtype=torch.float64, device=Z.device)
    betas = torch.tensor(ADAM_BETAS, dtype=torch.float64, device=Z.device)

    def keep_best() -> Tensor:
        value, gradient = objective_and_gradient(
            U_coordinates, scale, Z, projected_coordinates, gram, target_norm, lam
        )
        improved = value < best_value
        torch.where(improved[:, None, None], Z, best_Z, out=best_Z)
        torch.where(improved, value, best_value, out=best_value)
        return gradient

    def adam_step() -> None:
        """Adam's bias-corrected step, its powers beta^t kept on the device (no host value)."""
        gradient = keep_best()
        powers.mul_(betas)
        (beta1, beta2) = ADAM_BETAS
        first.lerp_(gradient, 1 - beta1)
        second.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
        denominator = second.div(1 - powers[1]).sqrt_().add_(ADAM_EPS)
        Z.addcdiv_(first * (-lr / (1 - powers[0])), denominator)

    repeat(adam_step, steps, Z.device)
    keep_best()
    dB = spanning @ (to_coordinates @ (scale * best_Z))
    return torch.where(solvable[:, None, None], dB, torch.zeros_like(U))


GRAPH_WARMUP = 3
"""Eager calls before a CUDA graph is captured (cuBLAS and the allocator settle in them)."""


def repeat(step: Callable[[], object], times: int, device: torch.device) -> None:
    """Call ``step`` (in-place work on fixed tensors, no host synchronisation) ``times`` times. On
    CUDA, after `GRAPH_WARMUP` eager calls, one call is captured as a CUDA graph and replayed: the
    same kernels without a launch from Python each (a step of a small batched problem is tens of
    kernels of microseconds)."""
    if device.type != "cuda" or times <= GRAPH_WARMUP:
        for _ in range(times):
            step()
        return
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(GRAPH_WARMUP):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(times - GRAPH_WARMUP):
        graph.replay()


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
    d(1 - cos)/dX = -P / (n ||T||) + <X, P> X G / (n^3 ||T||) with X = U + dB, n = sqrt(<X G, X>).
    Few kernels and allocations: it runs once per Adam step."""
    X = torch.addcmul(U, scale, Z)
    XG = X @ gram
    squared_norm = batched_dot(XG, X).clamp_min(torch.finfo(X.dtype).tiny)
    a = (squared_norm.sqrt() * target_norm).reciprocal()
    cosine = batched_dot(X, projected) * a
    penalty = lam * scale.square()
    value = torch.addcmul(1 - cosine, penalty.view(-1), batched_dot(Z, Z))
    gradient = XG * (scale * (cosine / squared_norm)[:, None, None])
    gradient.addcmul_(projected, scale * a[:, None, None], value=-1)
    return value, gradient.addcmul_(Z, penalty, value=2)


def batched_dot(x: Tensor, y: Tensor) -> Tensor:
    """<x_m, y_m> (the sum of the entrywise product) per leading index m, as one batched GEMM."""
    return (x.flatten(1)[:, None, :] @ y.flatten(1)[:, :, None]).view(-1)
