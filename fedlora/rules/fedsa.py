"""FedSA-LoRA: share A, keep B local.

The server averages only A, A = sum_i p_i pad(sqrt(s_i) A_i); client i loads the leading r_i rows with
its sqrt(s_i) divided out and keeps its own B_i (and its head) in node state: B never leaves the
client, so each client runs a personal model and the method's metric is personal.
"""

from __future__ import annotations

import math
from dataclasses import replace

from torch import Tensor

from fedlora.adapter import Adapter, LoRAFactors, SharedA
from fedlora.client_state import ClientState
from fedlora.errors import InvalidUpdateError
from fedlora.lowrank import LowRank, pad_rows
from fedlora.messages import (
    A_SUFFIX,
    VERSION_KEY,
    Payload,
    modules_with_suffix,
    rank_key,
    scale_key,
    to_wire,
)
from fedlora.rules.base import AggregationRule, ClientSpec, GlobalState, RoundResult
from fedlora.updates import ClientUpdate


class FedSALoRA(AggregationRule):
    name = "fedsa"
    exact = False
    personalized = True
    update_kind = SharedA

    def init_state(self, initial: Adapter, head=None) -> GlobalState:
        """Only A is global; the head starts from the same seed on every client and stays there."""
        state = super().init_state(initial)
        return state

    def _aggregate(
        self, state: GlobalState, updates: list[ClientUpdate], weights: Tensor
    ) -> RoundResult:
        factors = {}
        for module in state.modules:
            rank = state.top_rank(module)
            V = sum(
                pad_rows(u.modules[module].A * math.sqrt(u.modules[module].scale), rank) * p
                for u, p in zip(updates, weights.tolist())
            )
            U = state.factors[module].U
            factors[module] = LowRank(U, V)
        return RoundResult(
            replace(state, version=state.version + 1, factors=factors), None, None, None
        )

    def client_payload(self, state: GlobalState, spec: ClientSpec) -> Payload:
        adapter, config = {}, {VERSION_KEY: state.version}
        for module, folded in state.factors.items():
            rank, scale = spec.ranks[module], spec.scales[module]
            if rank > folded.inner_rank:
                raise InvalidUpdateError(
                    f"module {module!r}: client rank {rank} above the global rank {folded.inner_rank}"
                )
            adapter[module + A_SUFFIX] = to_wire(folded.V[:rank] / math.sqrt(scale))
            config[rank_key(module)] = rank
            config[scale_key(module)] = float(scale)
        return Payload(adapter=adapter, config=config)

    def client_step(self, local: ClientState, payload: Payload, cache=None) -> ClientState:
        """Load the shared A; keep the client's own B and head."""
        adapter: Adapter = {}
        for module in modules_with_suffix(payload.adapter, A_SUFFIX):
            own = local.adapter[module]
            A = payload.adapter[module + A_SUFFIX].to(own.A.dtype)
            if A.shape[0] != own.rank:
                raise InvalidUpdateError(
                    f"module {module!r}: received A of rank {A.shape[0]}, client has rank {own.rank}"
                )
            adapter[module] = LoRAFactors(A=A, B=own.B, scale=own.scale)
        return replace(local, adapter=adapter)
