"""Flower Message-API strategies, one per federated LoRA method, by rule name in `STRATEGIES`."""

from strategies.base import LoRAStrategy
from strategies.fedsb import FedSB
from strategies.methods import (
    FedExLoRA,
    FedSALoRA,
    FlexLoRA,
    FLoRA,
    HetLoRA,
    LoRAFAIR,
    LoRAFedAvg,
)

STRATEGIES: dict[str, type[LoRAStrategy]] = {
    strategy.rule_class.name: strategy
    for strategy in (LoRAFedAvg, FedExLoRA, FLoRA, FedSALoRA, FedSB, LoRAFAIR, FlexLoRA, HetLoRA)
}

__all__ = [
    "STRATEGIES",
    "FLoRA",
    "FedExLoRA",
    "FedSALoRA",
    "FedSB",
    "FlexLoRA",
    "HetLoRA",
    "LoRAFAIR",
    "LoRAFedAvg",
    "LoRAStrategy",
]
