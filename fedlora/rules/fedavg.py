"""FedAvg of LoRA factors (FedIT): average A and B separately, zero-padding mixed ranks.

A = sum_i p_i pad(sqrt(s_i) A_i), B = sum_i p_i pad(sqrt(s_i) B_i); client i loads the leading r_i
rows of A and columns of B with its own sqrt(s_i) divided out. Not exact: the product of the averages
is not the average of the products. Robust options: norm bounding, and the coordinate-wise median or
trimmed mean of the padded folded factors in place of the weighted mean.
"""

from __future__ import annotations

from torch import Tensor

from fedlora.lora.client_state import ClientState
from fedlora.lora.lowrank import LowRank
from fedlora.lora.updates import ClientUpdate, ClientUpdates, average_head, example_weights
from fedlora.rules.base import (
    AggregationRule,
    ClientSpec,
    GlobalState,
    RoundResult,
    adapter_payload,
    difference,
    ideal_and_reference,
    ideal_over_trainers,
    load_adapter,
    padded_averages,
    robust_padded_factors,
)
from fedlora.wire.messages import Payload


class FedAvg(AggregationRule):
    name = "fedavg"
    exact = False
    combinations = ("mean", "trimmed-mean", "median")
    client_dp_refusal = None

    takes_server_optimizer = True

    def _aggregate(
        self, state: GlobalState, updates: list[ClientUpdate], weights: Tensor
    ) -> RoundResult:
        averaged = self._average_factors(state, updates, weights)
        if self.server_optimizer.is_plain_average:
            return self._result(state, updates, weights, averaged)
        factors, moments = self._server_step(state, averaged)
        result = self._result(state, updates, weights, factors)
        result.state.optimizer = moments
        return result

    def _server_step(self, state: GlobalState, averaged: dict) -> tuple[dict, dict]:
        """The averaged factors' change from the previous ones, through the server optimizer."""
        params, deltas = {}, {}
        for module, new in averaged.items():
            old = state.factors[module]
            params[f"{module}.U"], params[f"{module}.V"] = old.U, old.V
            deltas[f"{module}.U"], deltas[f"{module}.V"] = new.U - old.U, new.V - old.V
        stepped, moments = self.server_optimizer.step(params, deltas, state.optimizer)
        factors = {m: LowRank(stepped[f"{m}.U"], stepped[f"{m}.V"]) for m in averaged}
        return factors, moments

    def _average_factors(self, state, updates, weights) -> dict:
        """Each module's combination of the clients' factors, over T_m, the clients that trained it
        (every client, but where the rule allows module subsets), with the weights p_i / P_m; a
        module nobody trained keeps its global factors."""
        batch = ClientUpdates.of(updates)
        factors = {}
        for trainers, modules in batch.by_trainers(state.modules):
            if not trainers:
                factors.update({module: state.factors[module] for module in modules})
                continue
            ranks = {module: state.top_rank(module) for module in modules}
            p = weights if trainers is batch else example_weights(trainers)
            factors.update(self._combine(trainers, p, ranks))
        return {module: factors[module] for module in state.modules}

    def _combine(self, updates, weights, ranks: dict[str, int]) -> dict[str, LowRank]:
        """The weighted mean of the padded folded factors of every module of ``ranks`` at its rank
        (`padded_averages`; ``weights`` per client, or per module and client), or the configured
        robust combination."""
        if self.robustness.combination == "mean":
            return padded_averages(updates, weights, ranks)
        return {
            module: robust_padded_factors(updates, module, rank, self.robustness)
            for module, rank in ranks.items()
        }

    def _ideal(self, state, updates, weights) -> tuple[dict, dict]:
        """The ideal update sum_i p_i B_i A_i per module, and the reference norms (over T_m with
        the weights p_i / P_m, where the rule allows module subsets)."""
        if self.allows_module_subsets:
            return ideal_over_trainers(state.factors, ClientUpdates.of(updates), state.shapes)
        return ideal_and_reference(state.factors, updates, weights)

    def _result(self, state, updates, weights, factors) -> RoundResult:
        ideal, reference = self._ideal(state, updates, weights)
        new_state = GlobalState(
            version=state.version + 1,
            shapes=state.shapes,
            factors=factors,
            head=average_head(updates, weights) or state.head,
        )
        update = {m: difference(factors[m], state.factors[m]) for m in factors}
        return RoundResult(new_state, update, ideal, reference)

    def client_payload(self, state: GlobalState, spec: ClientSpec) -> Payload:
        return adapter_payload(state, spec)

    def client_step(self, local: ClientState, payload: Payload, cache=None) -> ClientState:
        return load_adapter(local, payload)
