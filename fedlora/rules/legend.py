"""LEGEND: a LoRA depth and a rank per layer for each device, aggregated layer by layer.

Liu et al., "Adaptive Parameter-Efficient Federated Fine-Tuning on Heterogeneous Devices" (LEGEND,
arXiv 2412.20004): LoRA layers with higher ranks close to the output save a device's compute and
memory at little cost in accuracy. A device therefore adapts only the top d_i transformer layers
(its *LoRA depth*: no backward pass below them) with a *rank distribution* that grows towards the
output, both chosen from its capacity; the server aggregates each layer over the devices that
adapted it.

Here a device's capacity is its rank class c_i (node config ``lora-rank``, or the run's
``rank-profile``), out of the run's top rank r (``lora-rank``); with L layers holding adapted
modules (`legend_ranks`):

    d_i = ceil(L c_i / r),   rank of the k-th adapted layer from the top = ceil(c_i (d_i - k) / d_i)

so the top layer trains at c_i and the ranks fall linearly to about c_i / d_i at the deepest
adapted layer; a larger class adapts a superset of layers at ranks at least as large. (The paper
picks depth and ranks with a greedy search over measured per-device costs; the capacity classes
stand in for that measurement here.) Clients build the model with peft's ``layers_to_transform``
and ``rank_pattern``.

Aggregation, per module m over T_m, the clients that adapted it (weights p_i / P_m, P_m the sum of
p_j over T_m): the zero-padded folded factors are averaged as FedAvg averages them, so a module's
global factors are the average over T_m; a module nobody trained this round keeps its global
factors. A client loads the leading slices of the modules it adapts; below its depth it runs the
pretrained weights, as the paper's devices do. Not exact (FedAvg's product of averages), per module:
the deviation is measured against dW*_m = sum_{i in T_m} p_i dW_{i,m} / P_m.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace

from fedlora.rules.base import (
    ClientSpec,
    GlobalState,
    adapter_payload,
)
from fedlora.rules.fedavg import FedAvg
from fedlora.wire.messages import A_SUFFIX, B_SUFFIX, Payload

LAYER_INDEX = re.compile(r".*?\.[^.]*\.(\d+)\.")
"""A module path's transformer layer index, the first numbered segment, as peft's
``layers_to_transform`` finds it."""


def layer_index(module: str) -> int | None:
    """The layer a module path belongs to (``...layer.3.attention...`` -> 3), or None."""
    found = LAYER_INDEX.match(module)
    return int(found.group(1)) if found else None


def legend_ranks(capacity: int, modules: Sequence[str], top_rank: int) -> dict[str, int]:
    """The ranks a device of capacity class ``capacity`` (1..top_rank) trains: the modules of its
    top d layers, d = ceil(L capacity / top_rank), the k-th layer from the top at rank
    ceil(capacity (d - k) / d). Modules outside the numbered layers are not adapted (peft's
    ``layers_to_transform`` leaves them out); a model without numbered layers is one layer."""
    if not 1 <= capacity <= top_rank:
        raise ValueError(f"LEGEND capacity {capacity} outside 1..{top_rank}")
    indexed = {module: layer_index(module) for module in modules}
    if all(index is None for index in indexed.values()):
        indexed = dict.fromkeys(modules, 0)
    layers = sorted({index for index in indexed.values() if index is not None}, reverse=True)
    depth = max(1, math.ceil(len(layers) * capacity / top_rank))
    rank_of = {
        layer: math.ceil(capacity * (depth - k) / depth) for k, layer in enumerate(layers[:depth])
    }
    return {module: rank_of[i] for module, i in indexed.items() if i in rank_of}


class LEGEND(FedAvg):
    name = "legend"
    exact = False
    takes_server_optimizer = False
    allows_module_subsets = True
    client_dp_refusal = "its weights p_i / P_m are renormalised per module over the clients in T_m"

    def client_ranks(self, rank: int, modules: Sequence[str], top_rank: int) -> dict[str, int]:
        """The device's LoRA depth and rank distribution (`legend_ranks`)."""
        return legend_ranks(rank, modules, top_rank)

    def rank_refusal(
        self, ranks: Mapping[str, int], modules: Sequence[str], top_rank: int
    ) -> str | None:
        """Why ``ranks`` are no LEGEND configuration of any capacity class (None if they are
        one, or a pruned-free restatement of one)."""
        for capacity in range(1, top_rank + 1):
            if legend_ranks(capacity, modules, top_rank) == dict(ranks):
                return None
        return "its depth and ranks are no LEGEND configuration of any capacity class"

    def client_payload(self, state: GlobalState, spec: ClientSpec) -> Payload:
        """The leading slices of the modules the client adapts, and the head."""
        adapted = {module: state.factors[module] for module in spec.ranks}
        return adapter_payload(replace(state, factors=adapted), spec)

    def reply_shapes(
        self, state: GlobalState, ranks: Mapping[str, int]
    ) -> dict[str, tuple[int, ...]]:
        """A and B of the modules the client adapts."""
        shapes: dict[str, tuple[int, ...]] = {}
        for module, rank in ranks.items():
            d_out, d_in = state.shapes[module]
            shapes[module + A_SUFFIX] = (rank, d_in)
            shapes[module + B_SUFFIX] = (d_out, rank)
        return shapes
