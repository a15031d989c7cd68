"""Fed-SB: average the r x r matrix R trained between fixed B and A."""

from fedlora.rules.base import AggregationRule


class FedSB(AggregationRule):
    name = "fedsb"
    exact = False
