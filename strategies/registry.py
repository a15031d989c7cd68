"""Every method's strategy class, and `STRATEGIES`: each method's strategy by its name in
`fedlora.rules.RULES`. Importing this module imports the bindings (`strategies.methods`,
`strategies.fedsb`), which register themselves with `strategies.base.strategy_class`."""

from collections.abc import Iterator, Mapping

from fedlora.rules import RULES
from strategies.base import LoRAStrategy, strategy_class
from strategies.fedsb import FedSB
from strategies.methods import (
    LEGEND,
    FedExLoRA,
    FedSALoRA,
    FFALoRA,
    FlexLoRA,
    FLoRA,
    FSLoRA,
    HetLoRA,
    LoRAFAIR,
    LoRAFedAvg,
)


class StrategiesByName(Mapping):
    """Each registered method's strategy by name, read from the registry when asked (a method
    registered later is in it)."""

    def __getitem__(self, name: str) -> type[LoRAStrategy]:
        if name not in RULES:
            raise KeyError(name)
        return strategy_class(name)

    def __iter__(self) -> Iterator[str]:
        return iter(RULES)

    def __len__(self) -> int:
        return len(RULES)


STRATEGIES = StrategiesByName()

__all__ = [
    "LEGEND",
    "STRATEGIES",
    "FFALoRA",
    "FLoRA",
    "FSLoRA",
    "FedExLoRA",
    "FedSALoRA",
    "FedSB",
    "FlexLoRA",
    "HetLoRA",
    "LoRAFAIR",
    "LoRAFedAvg",
    "LoRAStrategy",
    "strategy_class",
]
