"""Random LoRA factors in float64 for the rules' brute-force tests."""

import torch

from fedlora.lora.adapter import LoRAFactors


def random_factors(generator, shape, rank, scale=None) -> LoRAFactors:
    """A (rank x d_in) and B (d_out x rank) from ``generator``; scale alpha / r with alpha 16."""
    d_out, d_in = shape
    return LoRAFactors(
        A=torch.randn(rank, d_in, generator=generator, dtype=torch.float64),
        B=torch.randn(d_out, rank, generator=generator, dtype=torch.float64),
        scale=16 / rank if scale is None else scale,
    )


def random_adapter(generator, shapes, rank) -> dict[str, LoRAFactors]:
    """Factors of ``rank`` for every module of ``shapes``."""
    return {module: random_factors(generator, shape, rank) for module, shape in shapes.items()}
