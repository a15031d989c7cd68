"""HetLoRA: sparsity-weighted aggregation of zero-padded factors, local rank self-pruning."""

from fedlora.rules.base import AggregationRule


class HetLoRA(AggregationRule):
    name = "hetlora"
    exact = False
