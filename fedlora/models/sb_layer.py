"""The LoRA-SB layer (peft has none): a frozen base weight plus B R A; only a block of R trains.

    y = base(x) + B (R_global (A x) + pad(delta ((A x)[..., :r_i])))

A (r x d_in), B (d_out x r) and the global R (r x r) are frozen; the trainable delta (r_i x r_i,
zero at the start of a round) is the client's leading block of R, so the client's full R is
R_global + pad(delta). A separate delta parameter, rather than a gradient mask on R, keeps weight
decay and DP noise off the rest of R. Every part is an ``nn.Linear`` without bias, so Opacus
computes per-sample gradients with its hooks. Bases are ``nn.Linear`` or GPT-2's ``Conv1D`` (weight
stored d_in x d_out); the factors are always in ``nn.Linear`` orientation (d_out x d_in).

The functions below address layers by their path in the model they are given (for a model wrapped
by Opacus, pass the wrapped module).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from fedlora.errors import ConfigError
from fedlora.lora.lowrank import LowRank

SUPPORTED_BASES = (nn.Linear, Conv1D)
"""The base layers Fed-SB wraps: torch's Linear and GPT-2's Conv1D (weight stored d_in x d_out)."""


def base_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a base layer Fed-SB can wrap, in ``nn.Linear`` orientation."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, Conv1D):
        return module.nf, module.nx
    raise ConfigError(
        f"Fed-SB wraps nn.Linear or GPT-2 Conv1D layers only, not {type(module).__name__}"
    )


def to_linear_orientation(module: nn.Module, matrix: Tensor) -> Tensor:
    """A matrix shaped like the module's weight, turned to (d_out x d_in): Conv1D's transposed."""
    return matrix.T.contiguous() if isinstance(module, Conv1D) else matrix


def frozen_linear(weight: Tensor, like: Tensor) -> nn.Linear:
    """A bias-free, frozen nn.Linear holding ``weight`` (out x in), on ``like``'s device/dtype."""
    out_features, in_features = weight.shape
    layer = nn.utils.skip_init(
        nn.Linear, in_features, out_features, bias=False, device=like.device, dtype=like.dtype
    )
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer.requires_grad_(False)


class SBLinear(nn.Module):
    """A frozen base layer plus B (R_global + pad(delta)) A; only delta (r_i x r_i) trains."""

    def __init__(self, base: nn.Module, fixed: LowRank, core: Tensor, capacity: int):
        super().__init__()
        shape = base_shape(base)
        rank = fixed.inner_rank
        if fixed.shape != shape:
            raise ConfigError(f"fixed factors of shape {fixed.shape} for a layer of shape {shape}")
        check_core_shape(core, rank)
        if not 1 <= capacity <= rank:
            raise ConfigError(f"Fed-SB capacity {capacity} outside 1..{rank}")
        like = base.weight
        self.base = base.requires_grad_(False)
        self.capacity = capacity
        self.sb_A = frozen_linear(fixed.V, like)
        self.sb_B = frozen_linear(fixed.U, like)
        self.sb_R = frozen_linear(core, like)
        self.sb_delta = nn.utils.skip_init(
            nn.Linear, capacity, capacity, bias=False, device=like.device, dtype=like.dtype
        )
        nn.init.zeros_(self.sb_delta.weight)

    @property
    def rank(self) -> int:
        return self.sb_R.in_features

    def forward(self, x: Tensor) -> Tensor:
        projected = self.sb_A(x)
        trained = self.sb_delta(projected[..., : self.capacity])
        core = self.sb_R(projected) + F.pad(trained, (0, self.rank - self.capacity))
        return self.base(x) + self.sb_B(core)

    def full_core(self) -> Tensor:
        """The client's current R = R_global + pad(delta), detached."""
        padding = self.rank - self.capacity
        delta = F.pad(self.sb_delta.weight, (0, padding, 0, padding))
        return (self.sb_R.weight + delta).detach().clone()

    @torch.no_grad()
    def load_core(self, core: Tensor) -> None:
        """R_global = core and delta = 0, in place (an optimizer holding delta stays valid)."""
        check_core_shape(core, self.rank)
        self.sb_R.weight.copy_(core)
        self.sb_delta.weight.zero_()

    def fixed_factors(self) -> LowRank:
        """The fixed factors as LowRank(U = B, V = A), detached."""
        return LowRank(self.sb_B.weight.detach().clone(), self.sb_A.weight.detach().clone())

    @torch.no_grad()
    def load_fixed_factors(self, fixed: LowRank) -> None:
        if fixed.shape != base_shape(self.base) or fixed.inner_rank != self.rank:
            raise ConfigError(
                f"fixed factors of shape {fixed.shape} and rank {fixed.inner_rank} for a layer "
                f"of shape {base_shape(self.base)} and rank {self.rank}"
            )
        self.sb_B.weight.copy_(fixed.U)
        self.sb_A.weight.copy_(fixed.V)


def check_core_shape(core: Tensor, rank: int) -> None:
    if tuple(core.shape) != (rank, rank):
        raise ConfigError(f"Fed-SB's R must be {rank} x {rank}, got {tuple(core.shape)}")


def find_targets(model: nn.Module, targets: Iterable[str]) -> dict[str, nn.Module]:
    """The modules whose path equals a target or ends with ``.target`` (as peft matches names)."""
    targets = tuple(targets)
    found = {
        name: module
        for name, module in model.named_modules()
        if any(name == target or name.endswith("." + target) for target in targets)
    }
    if not found:
        raise ConfigError(f"no module of the model matches the targets {list(targets)}")
    for name, module in found.items():
        if not isinstance(module, SUPPORTED_BASES):
            raise ConfigError(
                f"module {name!r} is {type(module).__name__}; Fed-SB wraps nn.Linear or GPT-2 "
                "Conv1D layers only"
            )
    return found


def inject_sb_layers(
    model: nn.Module,
    targets: Iterable[str],
    fixed: Mapping[str, LowRank],
    cores: Mapping[str, Tensor],
    capacity: int | Mapping[str, int],
) -> list[str]:
    """Replace every target module by an SBLinear around it; return their paths.

    ``fixed`` (U = B, V = A) and ``cores`` (R) are keyed by module path and must cover exactly the
    matched modules; ``capacity`` is r_i, one for all modules or per module. Move the model to its
    device before injecting.
    """
    found = find_targets(model, targets)
    check_same_modules(found, fixed, "fixed factors")
    check_same_modules(found, cores, "cores")
    for name, module in found.items():
        r_i = capacity if isinstance(capacity, int) else capacity[name]
        replace_module(model, name, SBLinear(module, fixed[name], cores[name], r_i))
    return sorted(found)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, module)


def sb_layers(model: nn.Module) -> dict[str, SBLinear]:
    """The model's SBLinear layers by path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SBLinear)}


def read_cores(model: nn.Module) -> dict[str, Tensor]:
    """Each layer's full R = R_global + pad(delta): what the client sends back."""
    return {name: layer.full_core() for name, layer in sb_layers(model).items()}


def load_cores(model: nn.Module, cores: Mapping[str, Tensor]) -> None:
    """Set every layer's R_global to the new R and its delta to zero."""
    layers = sb_layers(model)
    check_same_modules(layers, cores, "cores")
    for name, layer in layers.items():
        layer.load_core(cores[name])


def read_fixed_factors(model: nn.Module) -> dict[str, LowRank]:
    return {name: layer.fixed_factors() for name, layer in sb_layers(model).items()}


def load_fixed_factors(model: nn.Module, fixed: Mapping[str, LowRank]) -> None:
    layers = sb_layers(model)
    check_same_modules(layers, fixed, "fixed factors")
    for name, layer in layers.items():
        layer.load_fixed_factors(fixed[name])


def check_same_modules(
    layers: Mapping[str, object], given: Mapping[str, object], what: str
) -> None:
    if set(layers) != set(given):
        raise ConfigError(
            f"{what} for modules {sorted(given)}, but the model's Fed-SB modules are "
            f"{sorted(layers)}"
        )
