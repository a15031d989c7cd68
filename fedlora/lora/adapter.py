"""One model's LoRA adapter as plain tensors: per adapted module its A, B and scale.

Orientation is always that of ``torch.nn.Linear``: the module's weight W is (d_out x d_in) and the
adapter adds ``scale * B @ A`` with A (r x d_in) and B (d_out x r). GPT-2 ``Conv1D`` layers
(fan_in_fan_out) are turned to this orientation when read from a model (see `fedlora.models.peft_io`).

Mixed ranks and scales: to put adapters of different ranks and scales on one footing, the rules
average *folded* factors sqrt(s) B and sqrt(s) A (whose product is the adapter's product s B A), and a
client divides its own sqrt(s_i) out of the slice it receives (`LoRAFactors.from_folded`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from fedlora.lora.lowrank import LowRank


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """peft's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass(frozen=True)
class LoRAFactors:
    """One module's adapter: A (r x d_in), B (d_out x r) and its scale s; it adds s B A."""

    A: Tensor
    B: Tensor
    scale: float

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2:
            raise ValueError(
                f"A and B must be matrices; got A {tuple(self.A.shape)}, B {tuple(self.B.shape)}"
            )
        if self.A.shape[0] != self.B.shape[1]:
            raise ValueError(
                f"rank mismatch: A has {self.A.shape[0]} rows but B has {self.B.shape[1]} columns"
            )

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """The (d_out, d_in) of the adapted weight."""
        return (self.B.shape[0], self.A.shape[1])

    def folded(self) -> LowRank:
        """(sqrt(s) B) (sqrt(s) A): the same product with the scale split evenly over the factors."""
        root = math.sqrt(self.scale)
        return LowRank(self.B * root, self.A * root)

    def product(self) -> LowRank:
        """s B A as a LowRank (scale on A)."""
        return LowRank(self.B, self.A * self.scale)

    def delta(self) -> Tensor:
        """The dense s B A."""
        return self.product().dense()

    def summed(self) -> dict[str, Tensor]:
        """What the rules sum of this update, by factor: the folded B and A."""
        folded = self.folded()
        return {"B": folded.U, "A": folded.V}

    @classmethod
    def from_folded(cls, folded: LowRank, rank: int, scale: float) -> LoRAFactors:
        """The client's factors from the leading ``rank`` columns/rows of folded global factors."""
        root = math.sqrt(scale)
        return cls(A=folded.V[:rank] / root, B=folded.U[:, :rank] / root, scale=scale)


Adapter = dict[str, LoRAFactors]
"""A model's adapter: module name (peft's module path) -> its factors."""


@dataclass(frozen=True)
class SharedA:
    """FedSA-LoRA's upload: only A (r x d_in) and the scale; B never leaves the client."""

    A: Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def summed(self) -> dict[str, Tensor]:
        """What the rule sums of this update: the folded A, sqrt(s) A."""
        return {"A": math.sqrt(self.scale) * self.A}


@dataclass(frozen=True)
class SBCore:
    """Fed-SB's trained r x r matrix R; a client of capacity ``rank`` trained its leading block."""

    R: Tensor
    rank: int

    def __post_init__(self) -> None:
        if self.R.ndim != 2 or self.R.shape[0] != self.R.shape[1]:
            raise ValueError(f"Fed-SB's R must be square; got {tuple(self.R.shape)}")
        if not 0 < self.rank <= self.R.shape[0]:
            raise ValueError(f"Fed-SB capacity {self.rank} outside 1..{self.R.shape[0]}")

    def summed(self) -> dict[str, Tensor]:
        """What the rule sums of this update: R."""
        return {"R": self.R}


@dataclass(frozen=True)
class TrainedB:
    """FFA-LoRA's upload: only B (d_out x r) and the scale; A is frozen from a shared seed."""

    B: Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.B.shape[1]

    def summed(self) -> dict[str, Tensor]:
        """What the rule sums of this update: s B, in FFA-LoRA's coordinates G."""
        return {"B": self.scale * self.B}


ModuleUpdate = LoRAFactors | SharedA | SBCore | TrainedB
