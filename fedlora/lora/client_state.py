"""What a client holds between rounds, as plain tensors, and the weights it runs with."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedlora.lora.adapter import Adapter


@dataclass
class ClientState:
    """A client's adapter (its own ranks), trained head and base shift (base minus pretrained).

    Fed-SB clients also hold ``cores``: the r x r R between their fixed B and A (scale 1).
    """

    adapter: Adapter = field(default_factory=dict)
    head: dict[str, Tensor] = field(default_factory=dict)
    base_shift: dict[str, Tensor] = field(default_factory=dict)
    cores: dict[str, Tensor] = field(default_factory=dict)

    def effective_delta(self, module: str) -> Tensor:
        """The client's weight minus the pretrained one: base shift + s B A (or B R A for Fed-SB)."""
        factors = self.adapter[module]
        if module in self.cores:
            delta = factors.B @ self.cores[module] @ factors.A
        else:
            delta = factors.delta()
        shift = self.base_shift.get(module)
        return delta if shift is None else shift + delta


def module_seed(seed: int, module: str) -> int:
    """One seed per (run seed, module path)."""
    return zlib.crc32(f"{seed}:{module}".encode())


def fresh_lora_A(
    rank: int,
    d_in: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """A fresh A as peft initialises it (Kaiming-uniform with a = sqrt(5)), from a seed; drawn on
    the CPU (the same numbers on every device), then moved to ``device``."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / d_in**0.5
    return (
        (torch.rand(rank, d_in, generator=generator, dtype=torch.float64) * 2 - 1)
        .mul(bound)
        .to(device=device, dtype=dtype)
    )
