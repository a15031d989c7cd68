"""End-to-end exactness probes: how a model's weight change acts on a few seeded vectors.

For every adapted module, a client reports R = (W_eff - W_0) X, where W_eff is the weight it runs
with (its base weight plus its adapter, read from the live model), W_0 the pretrained weight and X
(d_in x `PROBE_COUNT`) standard Gaussian vectors drawn from the run's probe seed and the module's
name. The server computes R from its own ideal model (the previous global model plus the ideal
update of the last aggregation, as factors: U (V X), never dense) and reports the worst relative
difference. The check thus covers everything between the rule and the weights the client runs
with: serialization, payload, client step and the write into the model.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fedlora.lora.lowrank import LowRank
from fedlora.lora.measurement import worst
from fedlora.models.peft_io import (
    EXACT_DTYPES,
    base_shifts,
    base_weights,
    pretrained_weights,
    read_adapter,
)
from fedlora.models.sb_layer import read_cores, read_fixed_factors, sb_layers
from fedlora.wire.npy import moved_together

PROBE_RECORD = "probes"
"""The reply's record of probe responses, one (d_out x `PROBE_COUNT`) array per module."""
PROBE_SEED_KEY = "probe-seed"
"""Config key of the seed the server asks clients to probe with (absent: no probes)."""
PROBE_COUNT = 4
PROBE_VECTORS_KEPT = 512
"""Probe matrices kept on their devices (`probe_vectors_on`): a round's modules, for one seed."""
ABSOLUTE_FLOOR = 1e-12
"""Below this norm of both the expected response and the difference, the deviation is 0."""

Delta = Tensor | LowRank


def probe_vectors(seed: int, module: str, d_in: int) -> Tensor:
    """X (d_in x PROBE_COUNT), standard Gaussian in float64 from (seed, module name)."""
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{module}".encode()))
    return torch.randn(d_in, PROBE_COUNT, generator=generator, dtype=torch.float64)


@functools.lru_cache(maxsize=PROBE_VECTORS_KEPT)
def probe_vectors_on(seed: int, module: str, d_in: int, device: torch.device) -> Tensor:
    """`probe_vectors` on ``device``, made once per (seed, module, size, device): a round's
    clients and its server probe with the same vectors. Shared: never modify it."""
    return probe_vectors(seed, module, d_in).to(device)


def probe_response(delta: Delta, X: Tensor) -> Tensor:
    """delta X in float64; a `LowRank` as U (V X)."""
    if isinstance(delta, LowRank):
        return delta.U.double() @ (delta.V.double() @ X)
    return delta.double() @ X


def probe_responses(deltas: Mapping[str, Delta], seed: int) -> dict[str, Tensor]:
    """(W - W_0) X per module, for weight changes given densely or as factors, computed on their
    device; the responses on the CPU."""
    responses = {}
    for module, delta in deltas.items():
        device = delta.U.device if isinstance(delta, LowRank) else delta.device
        X = probe_vectors_on(seed, module, delta.shape[1], torch.device(device))
        responses[module] = probe_response(delta, X)
    return moved_together(responses, "cpu")


def relative_deviation(measured: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> float:
    """max over modules of ||measured - expected||_F / ||expected||_F (0 where both are below
    `ABSOLUTE_FLOOR`, NaN where a response is not finite); a module missing from ``measured`` is
    an error."""
    missing = sorted(set(expected) - set(measured))
    if missing:
        raise ValueError(f"probe responses missing for modules {missing}")
    deviations = []
    for module, target in expected.items():
        error = float(torch.linalg.matrix_norm(measured[module].double() - target))
        scale = float(torch.linalg.matrix_norm(target))
        if math.isnan(error) or max(error, scale) >= ABSOLUTE_FLOOR:
            deviations.append(error / max(scale, ABSOLUTE_FLOOR))
    return worst(deviations)


@torch.no_grad()
def lora_probe_responses(model: nn.Module, seed: int) -> dict[str, Tensor]:
    """(W_eff - W_0) X per LoRA module of a peft model, (base - pretrained) X + s B (A X) in
    float64 on the model's device (no dense product of the factors); the responses on the CPU."""
    changes = base_changes(model)
    responses = {}
    for module, factors in read_adapter(model).items():
        change = changes[module]
        X = probe_vectors_on(seed, module, change.shape[1], change.device)
        lora = factors.B.double() @ (factors.A.double() @ X)
        responses[module] = change @ X + factors.scale * lora
    return moved_together(responses, "cpu")


def base_changes(model: nn.Module) -> dict[str, Tensor]:
    """Base minus pretrained per LoRA module in float64; the exact shift for a base stored in
    bfloat16 (`base_shifts`, given the weights read here), whose weights round it."""
    pretrained = pretrained_weights(model)
    bases = base_weights(model)
    if all(base.dtype in EXACT_DTYPES for base in bases.values()):
        return {module: bases[module].double() - pretrained[module].double() for module in bases}
    shifts = base_shifts(model, pretrained, current=bases)
    return {
        module: shifts[module].double().to(base.device)
        if module in shifts
        else torch.zeros(base.shape, dtype=torch.float64, device=base.device)
        for module, base in bases.items()
    }


@torch.no_grad()
def sb_weight_changes(model: nn.Module) -> dict[str, LowRank]:
    """W_eff - W_0 per Fed-SB layer: B R A with the layer's full R (its base is untouched)."""
    if not sb_layers(model):
        raise ValueError("the model has no Fed-SB layers")
    cores = read_cores(model)
    return {
        module: LowRank(fixed.U.double().cpu(), (cores[module].double() @ fixed.V.double()).cpu())
        for module, fixed in read_fixed_factors(model).items()
    }
