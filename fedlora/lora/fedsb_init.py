"""Fed-SB's initialisation: LoRA-SB's first-step approximation, from the clients' gradients.

LoRA-SB fixes B and A from the first optimizer step: estimate the full-weight gradient G,
approximate the step dW, take its truncated SVD dW ~ U S V^T and set B = U (d_out x r),
A = V^T (r x d_in), R_0 = diag(S), at scale 1 (alpha = r). The initial model W + B R_0 A is that
approximated first step, the same for every client. A federation has no pooled data: each client
estimates G_i on its own batches (`estimate_gradient`) and the server combines the estimates by
example weights p_i. Two modes:

- sign mode (`sign_init`, LoRA-SB's rule): dW ~ -eta sign(G), an Adam-like first step, with
  G = sum_i p_i G_i. sign() is not linear, so the server needs the dense G_i: the upload is
  d_out x d_in floats per module per client (`dense_upload_floats`).
- sketch mode (`sketch_gradients` on the clients, `sketch_init` on the server): dW ~ -eta G, an
  SGD-like first step. Clients send Y_i = G_i Omega (d_out x k) and Z_i = Psi G_i (l x d_in) for
  seeded Gaussian Omega, Psi; sketching is linear, so sum_i p_i Y_i and sum_i p_i Z_i sketch the
  mean G exactly, and a single-pass randomized SVD (Tropp et al. 2017: Q = orth(Y),
  X = lstsq(Psi Q, Z), SVD of X) recovers it exactly whenever its rank is at most k. The upload is
  k d_out + l d_in floats per module per client (`sketch_upload_floats`), with k = r + oversample
  and l = 2k + 1 (capped by the matrix).

eta defaults to 1e-4 (`DEFAULT_ETA`); set it to the run's learning rate, as LoRA-SB does. Under
sample-level DP a client estimates G_i with `estimate_private_gradient`: each batch's gradient is
clipped per example and noised by Opacus' DP-SGD, and its steps count in the client's budget.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from fedlora.errors import ConfigError
from fedlora.lora.client_state import module_seed
from fedlora.lora.lowrank import LowRank
from fedlora.lora.updates import weighted_sum
from fedlora.models.sb_layer import find_targets, to_linear_orientation
from fedlora.privacy.accounting import History
from fedlora.privacy.sample_level import PrivacyPlan, private_training

DEFAULT_ETA = 1e-4
"""Step size of the approximated first step; LoRA-SB uses the run's learning rate."""
DEFAULT_OVERSAMPLE = 10
"""Extra columns of the random test matrices, for torch.svd_lowrank and for the sketches."""
DEFAULT_POWER_ITERATIONS = 4
"""Subspace iterations of torch.svd_lowrank in sign mode."""


@dataclass(frozen=True)
class SBInit:
    """Per module: the fixed factors LowRank(U = B, V = A) and R_0 (r x r)."""

    fixed: dict[str, LowRank]
    cores: dict[str, Tensor]


# ---- client side ----------------------------------------------------------------------------------


def estimate_gradient(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, object], Tensor],
    batches: Iterable[object],
    targets: Iterable[str],
) -> dict[str, Tensor]:
    """G per target module: d loss_fn(model, batch) / d weight, averaged over the batches.

    Targets match module paths as peft's do (a path equal to a target or ending with ``.target``);
    G is in ``nn.Linear`` orientation (d_out x d_in), GPT-2 Conv1D weights transposed. The model
    runs in the mode it is in; no ``.grad`` is written and the weights' requires_grad flags are
    restored.
    """
    count = 0
    with trainable_targets(model, targets) as modules:
        weights = [module.weight for module in modules.values()]
        totals = [torch.zeros_like(weight) for weight in weights]
        for batch in batches:
            grads = torch.autograd.grad(
                loss_fn(model, batch), weights, allow_unused=True, materialize_grads=True
            )
            for total, grad in zip(totals, grads):
                total.add_(grad)
            count += 1
    if count == 0:
        raise ConfigError("no batches to estimate the gradient on")
    return {
        name: to_linear_orientation(module, total / count)
        for (name, module), total in zip(modules.items(), totals)
    }


def estimate_private_gradient(
    model: nn.Module,
    loader: DataLoader,
    targets: Iterable[str],
    steps: int,
    plan: PrivacyPlan,
    history: History,
    task: str,
    device: torch.device,
) -> tuple[dict[str, Tensor], History]:
    """G per target module as DP-SGD sees it, and the accountant's history after it.

    Each of ``steps`` batches of ``loader`` (Poisson-sampled under the plan) gives the gradient
    of the target weights clipped per example to ``max_grad_norm``, summed, noised and divided
    by the expected batch size (Opacus' DPOptimizer, whose step is never taken); G is their mean,
    oriented as in `estimate_gradient`. The model runs in the mode it is in, but for the target
    modules, which run in training mode (Opacus records activations there only; a Linear layer
    computes the same in both). Every other parameter of ``model`` must be frozen.
    """
    with trainable_targets(model, targets) as modules:
        weights = [module.weight for module in modules.values()]
        totals = [torch.zeros_like(weight) for weight in weights]
        carrier = torch.optim.SGD(weights, lr=0.0)
        modes = {module: module.training for module in modules.values()}
        with private_training(model, carrier, loader, plan, history, task) as run:
            for module in modes:
                module.train()
            try:
                for batch in run.batches(steps):
                    batch = {key: tensor.to(device) for key, tensor in batch.items()}
                    run.loss(model, batch).backward()
                    run.optimizer.pre_step()
                    for total, weight in zip(totals, weights):
                        total.add_(weight.grad)
                    run.optimizer.zero_grad(set_to_none=True)
            finally:
                for module, mode in modes.items():
                    module.train(mode)
    gradients = {
        name: to_linear_orientation(module, total / steps)
        for (name, module), total in zip(modules.items(), totals)
    }
    return gradients, run.history


@contextmanager
def trainable_targets(model: nn.Module, targets: Iterable[str]) -> Iterator[dict[str, nn.Module]]:
    """The target modules by path, their weights requiring gradients for the block (the flags
    restored afterwards)."""
    modules = find_targets(model, targets)
    weights = [module.weight for module in modules.values()]
    flags = [weight.requires_grad for weight in weights]
    try:
        for weight in weights:
            weight.requires_grad_(True)
        yield modules
    finally:
        for weight, flag in zip(weights, flags):
            weight.requires_grad_(flag)


@dataclass(frozen=True)
class GradientSketch:
    """One module's gradient sketches: Y = G Omega (d_out x k) and Z = Psi G (l x d_in)."""

    Y: Tensor
    Z: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.Y.shape[0], self.Z.shape[1])

    def numel(self) -> int:
        """Floats uploaded: k d_out + l d_in."""
        return self.Y.numel() + self.Z.numel()


def sketch_gradients(
    gradients: Mapping[str, Tensor],
    rank: int,
    oversample: int = DEFAULT_OVERSAMPLE,
    seed: int = 0,
) -> dict[str, GradientSketch]:
    """Y = G Omega and Z = Psi G per module, with seeded test matrices that every party shares."""
    sketches = {}
    for module, gradient in gradients.items():
        omega, psi = sketch_operators(module, tuple(gradient.shape), rank, oversample, seed)
        omega, psi = omega.to(gradient), psi.to(gradient)
        sketches[module] = GradientSketch(Y=gradient @ omega, Z=psi @ gradient)
    return sketches


# ---- server side ----------------------------------------------------------------------------------


def sign_init(
    gradients: Sequence[Mapping[str, Tensor]],
    num_examples: Sequence[int],
    rank: int,
    eta: float = DEFAULT_ETA,
    oversample: int = DEFAULT_OVERSAMPLE,
    power_iterations: int = DEFAULT_POWER_ITERATIONS,
    seed: int = 0,
) -> SBInit:
    """LoRA-SB's rule: the truncated SVD of dW = -eta sign(sum_i p_i G_i), by torch.svd_lowrank.

    svd_lowrank draws q = r + oversample test columns (at most min(d_out, d_in)) from ``seed`` and
    runs ``power_iterations`` subspace iterations; it is exact when q covers min(d_out, d_in) or
    the rank of sign(G).
    """
    weights = example_fractions(num_examples, len(gradients))
    fixed, cores = {}, {}
    for module in same_modules(gradients):
        shape = check_rank(module, [tuple(g[module].shape) for g in gradients], rank)
        step = -eta * torch.sign(weighted_sum([g[module] for g in gradients], weights))
        q = min(rank + oversample, *shape)
        U, S, V = seeded_svd_lowrank(step, q, power_iterations, module_seed(seed, module))
        fixed[module] = LowRank(U[:, :rank].contiguous(), V[:, :rank].T.contiguous())
        cores[module] = torch.diag(S[:rank])
    return SBInit(fixed, cores)


def sketch_init(
    sketches: Sequence[Mapping[str, GradientSketch]],
    num_examples: Sequence[int],
    rank: int,
    eta: float = DEFAULT_ETA,
    oversample: int = DEFAULT_OVERSAMPLE,
    seed: int = 0,
) -> SBInit:
    """The truncated SVD of dW = -eta sum_i p_i G_i from the averaged sketches (single pass).

    Q = orth(Y), X = lstsq(Psi Q, Z), X = U_X S V^T, so dW ~ (Q U_X) S V^T: B = Q U_X[:, :r],
    A = V^T[:r], R_0 = diag(S[:r]). ``rank``, ``oversample`` and ``seed`` must be the clients'.
    """
    weights = example_fractions(num_examples, len(sketches))
    fixed, cores = {}, {}
    for module in same_modules(sketches):
        shape = check_rank(module, [s[module].shape for s in sketches], rank)
        check_sketch_sizes(module, [s[module] for s in sketches], shape, rank, oversample)
        Y = -eta * weighted_sum([s[module].Y for s in sketches], weights)
        Z = -eta * weighted_sum([s[module].Z for s in sketches], weights)
        psi = sketch_operators(module, shape, rank, oversample, seed)[1].to(Y)
        Q = torch.linalg.qr(Y).Q
        X = torch.linalg.lstsq(psi @ Q, Z).solution
        U_X, S, Vh = torch.linalg.svd(X, full_matrices=False)
        fixed[module] = LowRank(Q @ U_X[:, :rank], Vh[:rank].contiguous())
        cores[module] = torch.diag(S[:rank])
    return SBInit(fixed, cores)


def sketch_sizes(shape: tuple[int, int], rank: int, oversample: int) -> tuple[int, int]:
    """k = r + oversample columns of Omega and l = 2k + 1 rows of Psi, capped by the matrix."""
    d_out, d_in = shape
    k = min(rank + oversample, d_out, d_in)
    return k, min(2 * k + 1, d_out)


def sketch_operators(
    module: str, shape: tuple[int, int], rank: int, oversample: int, seed: int
) -> tuple[Tensor, Tensor]:
    """Omega (d_in x k) and Psi (l x d_out), standard Gaussian in float64 from (seed, module)."""
    d_out, d_in = shape
    k, l = sketch_sizes(shape, rank, oversample)
    generator = torch.Generator().manual_seed(module_seed(seed, module))
    omega = torch.randn(d_in, k, generator=generator, dtype=torch.float64)
    psi = torch.randn(l, d_out, generator=generator, dtype=torch.float64)
    return omega, psi


def dense_upload_floats(shapes: Mapping[str, tuple[int, int]]) -> int:
    """Floats one client uploads in sign mode: d_out x d_in per module."""
    return sum(d_out * d_in for d_out, d_in in shapes.values())


def sketch_upload_floats(
    shapes: Mapping[str, tuple[int, int]], rank: int, oversample: int = DEFAULT_OVERSAMPLE
) -> int:
    """Floats one client uploads in sketch mode: k d_out + l d_in per module."""
    total = 0
    for d_out, d_in in shapes.values():
        k, l = sketch_sizes((d_out, d_in), rank, oversample)
        total += k * d_out + l * d_in
    return total


# ---- shared plumbing ------------------------------------------------------------------------------


def seeded_svd_lowrank(
    matrix: Tensor, q: int, power_iterations: int, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """torch.svd_lowrank with its random test matrix drawn from ``seed``; the RNGs are restored."""
    kind = matrix.device.type
    devices = [] if kind == "cpu" else range(torch.get_device_module(kind).device_count())
    with torch.random.fork_rng(devices=devices, device_type=None if kind == "cpu" else kind):
        torch.manual_seed(seed)
        return torch.svd_lowrank(matrix, q=q, niter=power_iterations)


def example_fractions(num_examples: Sequence[int], clients: int) -> Tensor:
    """p_i = n_i / sum_j n_j."""
    if len(num_examples) != clients or clients == 0:
        raise ConfigError(f"{clients} clients' estimates but {len(num_examples)} example counts")
    if any(not isinstance(n, int) or n <= 0 for n in num_examples):
        raise ConfigError(f"example counts must be positive integers, got {list(num_examples)}")
    counts = torch.tensor(num_examples, dtype=torch.float64)
    return counts / counts.sum()


def same_modules(estimates: Sequence[Mapping[str, object]]) -> list[str]:
    modules = set(estimates[0])
    for index, estimate in enumerate(estimates):
        if set(estimate) != modules:
            raise ConfigError(
                f"client {index} estimates modules {sorted(estimate)}, client 0 {sorted(modules)}"
            )
    return sorted(modules)


def check_rank(module: str, shapes: Sequence[tuple[int, int]], rank: int) -> tuple[int, int]:
    """The clients' common (d_out, d_in), refusing a rank outside 1..min(d_out, d_in)."""
    if len(set(shapes)) != 1:
        raise ConfigError(
            f"module {module!r}: clients' estimates have shapes {sorted(set(shapes))}"
        )
    shape = shapes[0]
    if not 1 <= rank <= min(shape):
        raise ConfigError(f"module {module!r}: rank {rank} outside 1..{min(shape)}")
    return shape


def check_sketch_sizes(
    module: str,
    sketches: Sequence[GradientSketch],
    shape: tuple[int, int],
    rank: int,
    oversample: int,
) -> None:
    k, l = sketch_sizes(shape, rank, oversample)
    for sketch in sketches:
        if sketch.Y.shape[1] != k or sketch.Z.shape[0] != l:
            raise ConfigError(
                f"module {module!r}: sketches of sizes {sketch.Y.shape[1]} and "
                f"{sketch.Z.shape[0]}, expected {k} and {l} (rank {rank}, oversample {oversample})"
            )
