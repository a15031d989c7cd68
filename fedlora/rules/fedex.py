"""FedEx-LoRA: FedAvg's factors plus an exact residual folded into the base weights.

The global model is kept exact, W_t = W_{t-1} + dW*, and the averaged factors are shared as in FedAvg.
Client i loads its slice (B_i', A_i') and a base such that base_i + s_i B_i' A_i' = W_t; with mixed
ranks the base differs per rank, so the client derives it as W_t - s_i B_i' A_i' from the shared
W_t - W_0 (`BaseCache`, one per worker). The round's change dW* has inner rank <= sum_i r_i + r and
travels as factors, or dense where that is smaller; clients that skipped rounds receive the changes of
every round since the version they hold.

Module subsets: clients may adapt different subsets of the modules. Each module m is then aggregated
over T_m, the clients that trained it, with the weights p_i / P_m (P_m = sum_{T_m} p_i): the averaged
factors over T_m, and the change dW*_m = sum_{T_m} p_i / P_m dW_i, so that the residual
sum_{T_m} p_i / P_m s_i B_i A_i - (avg B)(avg A) is folded into module m's base; a module nobody
trained keeps its factors and its base. A client receives the slices of the modules it adapts and
the base changes of every module: exact per module.
"""

from __future__ import annotations

from dataclasses import replace

from torch import Tensor

from fedlora.lora.adapter import Adapter
from fedlora.lora.client_state import ClientState
from fedlora.lora.lowrank import LowRank
from fedlora.lora.updates import ClientUpdate
from fedlora.lora.versioning import BaseCache, ChangeLog, accumulated_changes
from fedlora.rules.base import (
    ClientSpec,
    GlobalState,
    RoundResult,
    adapter_payload,
    load_adapter,
    trained_factors,
)
from fedlora.rules.fedavg import FedAvg
from fedlora.rules.reconstruction import ReconstructedUpdates, rank_classes, state_dtype
from fedlora.wire.messages import (
    FROM_VERSION_KEY,
    VERSION_KEY,
    Payload,
    change_from_tensors,
    change_to_tensors,
)


class FedExLoRA(FedAvg):
    name = "fedex"
    takes_server_optimizer = False
    exact = True
    allows_module_subsets = True
    combinations = ("mean",)
    client_dp_refusal = (
        "its exact residual sum_i p_i s_i B_i A_i - s B A sums products of each client's factors"
    )

    def init_state(self, initial: Adapter, head=None) -> GlobalState:
        state = super().init_state(initial, head)
        state.changes = ChangeLog()
        return state

    def _aggregate(
        self, state: GlobalState, updates: list[ClientUpdate], weights: Tensor
    ) -> RoundResult:
        result = super()._aggregate(state, updates, weights)
        new_state = replace(result.state, changes=state.changes.appended(result.ideal_update))
        reconstructed = ReconstructedUpdates(
            self, state, new_state, rank_classes(updates), state_dtype(state)
        )
        return RoundResult(
            new_state,
            dict(result.ideal_update),
            result.ideal_update,
            result.reference_norm,
            reconstructed,
        )

    def global_delta(self, state: GlobalState, module: str) -> LowRank:
        """W_t - W_0: the sum of every round's change (the adapter's product is part of the base's)."""
        return accumulated_changes(state, module)

    def client_payload(self, state: GlobalState, spec: ClientSpec) -> Payload:
        payload = adapter_payload(
            replace(state, factors=trained_factors(state.factors, spec)), spec
        )
        from_version, change = state.changes.since(spec.version)
        payload.base_change = change_to_tensors(change)
        payload.config[FROM_VERSION_KEY] = from_version
        return payload

    def client_step(
        self, local: ClientState, payload: Payload, cache: BaseCache | None = None
    ) -> ClientState:
        """Catch the shared base up to W_t, load the slice, and set base_i = W_t - s_i B_i' A_i'."""
        if cache is None:
            raise ValueError("FedEx-LoRA's client step needs the worker's BaseCache")
        version = int(payload.config[VERSION_KEY])
        cache.catch_up(
            change_from_tensors(payload.base_change), int(payload.config[FROM_VERSION_KEY]), version
        )
        loaded = load_adapter(local, payload)
        base_shift = {}
        for module, factors in loaded.adapter.items():
            delta = factors.delta()
            base_shift[module] = cache.shift_of(module, delta).to(delta) - delta
        return replace(loaded, base_shift=base_shift)
