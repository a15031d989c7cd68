"""The aggregation rules, by name: `RULES` is the registry of the methods, the run config's
``strategy`` names one of them (the method's strategy binds its rule, `strategies.strategy_class`)."""

from fedlora.rules.base import AggregationRule, ClientSpec, GlobalState, RoundResult
from fedlora.rules.fedavg import FedAvg
from fedlora.rules.fedex import FedExLoRA
from fedlora.rules.fedsa import FedSALoRA
from fedlora.rules.fedsb import FedSB
from fedlora.rules.ffalora import FFALoRA
from fedlora.rules.flexlora import FlexLoRA
from fedlora.rules.flora import FLoRA
from fedlora.rules.fslora import FSLoRA
from fedlora.rules.hetlora import HetLoRA
from fedlora.rules.legend import LEGEND
from fedlora.rules.lorafair import LoRAFAIR

RULES: dict[str, type[AggregationRule]] = {
    rule.name: rule
    for rule in (
        FedAvg,
        FedExLoRA,
        FLoRA,
        FedSALoRA,
        FedSB,
        LoRAFAIR,
        FlexLoRA,
        HetLoRA,
        FFALoRA,
        FSLoRA,
        LEGEND,
    )
}


def rule_class(name: str) -> type[AggregationRule]:
    """The rule registered as ``name``."""
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(
            f"unknown aggregation rule {name!r}; choose one of {sorted(RULES)}"
        ) from None


def make_rule(name: str, **options) -> AggregationRule:
    """The rule registered as ``name``, built with its options."""
    return rule_class(name)(**options)


__all__ = [
    "RULES",
    "AggregationRule",
    "ClientSpec",
    "GlobalState",
    "RoundResult",
    "make_rule",
    "rule_class",
]
