"""FlexLoRA: truncated SVD of the averaged products, best rank-r_i factors per client."""

from fedlora.rules.base import AggregationRule


class FlexLoRA(AggregationRule):
    name = "flexlora"
    exact = False
