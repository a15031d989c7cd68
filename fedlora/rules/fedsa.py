"""FedSA-LoRA: share A, keep B local.

The server averages only A, A = sum_i p_i pad(sqrt(s_i) A_i); client i loads the leading r_i rows with
its sqrt(s_i) divided out and keeps its own B_i (and its head) in node state: B never leaves the
client, so each client runs a personal model and the method's metric is personal.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from fedlora.errors import InvalidUpdateError
from fedlora.lora.adapter import Adapter, LoRAFactors, SharedA
from fedlora.lora.client_state import ClientState
from fedlora.lora.lowrank import LowRank
from fedlora.lora.updates import ClientUpdate
from fedlora.rules.base import AggregationRule, ClientSpec, GlobalState, RoundResult
from fedlora.rules.robust import (
    bounded_shared_a,
    robust_padded_rows,
    shared_a_norms,
    with_modules,
)
from fedlora.wire.messages import (
    A_SUFFIX,
    VERSION_KEY,
    Payload,
    modules_with_suffix,
    rank_key,
    scale_key,
    to_wire,
)


class FedSALoRA(AggregationRule):
    name = "fedsa"
    exact = False
    personalized = True
    update_kind = SharedA
    combinations = ("mean", "trimmed-mean", "median")
    client_dp_refusal = None
    keeps_node_state = True

    def client_reply(self, trained: Adapter, lora_alpha: float, rslora: bool) -> dict:
        """Only A (with its scale) leaves the client; B and the head stay on the node."""
        return {module: SharedA(A=f.A, scale=f.scale) for module, f in trained.items()}

    def init_state(self, initial: Adapter, head=None) -> GlobalState:
        """Only A is global; the head starts from the same seed on every client and stays there."""
        return super().init_state(initial)

    def _aggregate(
        self, state: GlobalState, updates: list[ClientUpdate], weights: Tensor
    ) -> RoundResult:
        factors = {}
        for module in state.modules:
            shared = [u.modules[module] for u in updates]
            rank, robust = state.top_rank(module), self.robustness
            if robust.combination == "mean":
                rows = padded_row_average(shared, weights, rank)
            else:
                folded = [a.A * math.sqrt(a.scale) for a in shared]
                rows = robust_padded_rows(folded, rank, robust.combination, robust.trim_fraction)
            factors[module] = LowRank(state.factors[module].U, rows)
        return RoundResult(
            replace(state, version=state.version + 1, factors=factors), None, None, None
        )

    def bounded_updates(self, state: GlobalState, updates) -> list[ClientUpdate]:
        """The server never sees B_i: it bounds the shared change ||sqrt(s_i) (A_i - A_i0)||_F."""
        bounded: list[dict] = [{} for _ in updates]
        for module in state.modules:
            start = state.factors[module]
            shrink = self.robustness.shrink_factors(shared_a_norms(updates, start, module))
            for i, update in enumerate(updates):
                bounded[i][module] = bounded_shared_a(
                    update.modules[module], start, float(shrink[i])
                )
        return [with_modules(update, modules) for update, modules in zip(updates, bounded)]

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

    def reply_shapes(self, state: GlobalState, ranks) -> dict[str, tuple[int, ...]]:
        """Only ``lora_A`` (r x d_in) per module: B stays on the client."""
        return {
            module + A_SUFFIX: (ranks[module], d_in) for module, (_, d_in) in state.shapes.items()
        }

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


def padded_row_average(shared: list[SharedA], weights: Tensor, rank: int) -> Tensor:
    """sum_i p_i pad(sqrt(s_i) A_i): every client's rows in one concatenation, added in place."""
    device, dtype = shared[0].A.device, shared[0].A.dtype
    row_weights = [
        p * math.sqrt(a.scale) for a, p in zip(shared, weights.tolist()) for _ in range(a.rank)
    ]
    position = [j for a in shared for j in range(a.rank)]
    rows = (
        torch.cat([a.A for a in shared])
        * torch.tensor(row_weights, dtype=dtype).to(device, non_blocking=True)[:, None]
    )
    return rows.new_zeros(rank, rows.shape[1]).index_add_(
        0, torch.tensor(position).to(device, non_blocking=True), rows
    )
