"""LoRA-FAIR: FedAvg's factors, then a server-side correction of B."""

from fedlora.rules.base import AggregationRule


class LoRAFAIR(AggregationRule):
    name = "lorafair"
    exact = False
