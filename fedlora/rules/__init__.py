"""The aggregation rules, by name."""

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
    )
}


def make_rule(name: str, **options) -> AggregationRule:
    """The rule registered as ``name``, built with its options."""
    try:
        rule = RULES[name]
    except KeyError:
        raise ValueError(
            f"unknown aggregation rule {name!r}; choose one of {sorted(RULES)}"
        ) from None
    return rule(**options)


__all__ = ["RULES", "AggregationRule", "ClientSpec", "GlobalState", "RoundResult", "make_rule"]
