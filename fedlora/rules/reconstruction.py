"""The round's update as clients reconstruct it from their payloads, measured on the server.

For the rules whose global update is the ideal one by construction (FedEx-LoRA, FLoRA), comparing
the two would measure nothing. Instead, for one client of each rank class of the round, the server
builds the payload that client would receive (`AggregationRule.client_payload`, from base version 0)
and applies the client's step (`AggregationRule.client_step`) to a pure `ClientState` in the
server's dtype, with a fresh `BaseCache`; the client's effective weights minus W_{t-1} is its
reconstructed update, compared with dW* in float64. A payload that loses or bends anything shows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor

from fedlora.lora.adapter import LoRAFactors
from fedlora.lora.client_state import ClientState
from fedlora.lora.updates import ClientUpdate
from fedlora.lora.versioning import BaseCache
from fedlora.rules.base import AggregationRule, ClientSpec, GlobalState


def rank_classes(updates: Sequence[ClientUpdate]) -> list[ClientSpec]:
    """One spec per distinct (ranks, scales) among the round's clients, in order of appearance."""
    specs: dict[tuple, ClientSpec] = {}
    for update in updates:
        ranks = {m: f.rank for m, f in update.modules.items()}
        scales = {m: f.scale for m, f in update.modules.items()}
        key = (tuple(sorted(ranks.items())), tuple(sorted(scales.items())))
        specs.setdefault(key, ClientSpec(ranks=ranks, scales=scales))
    return list(specs.values())


class ReconstructedUpdates(Mapping):
    """Per module, the dense float64 W_t - W_{t-1} each rank class reconstructs (computed once,
    on first read: it is a measurement, not part of the aggregation)."""

    def __init__(
        self,
        rule: AggregationRule,
        previous: GlobalState,
        state: GlobalState,
        specs: Sequence[ClientSpec],
        dtype: torch.dtype,
    ):
        self._rule, self._previous, self._state = rule, previous, state
        self._specs, self._dtype = list(specs), dtype
        self._updates: dict[str, list[Tensor]] | None = None

    def __getitem__(self, module: str) -> list[Tensor]:
        if self._updates is None:
            self._updates = self._reconstruct()
        return self._updates[module]

    def __iter__(self):
        return iter(self._state.modules)

    def __len__(self) -> int:
        return len(self._state.modules)

    def _reconstruct(self) -> dict[str, list[Tensor]]:
        rule, modules = self._rule, self._state.modules
        before = {m: rule.global_delta(self._previous, m).dense().double() for m in modules}
        updates: dict[str, list[Tensor]] = {m: [] for m in modules}
        device = next(iter(before.values())).device
        for spec in self._specs:
            local = pure_client(self._state.shapes, spec, self._dtype, device)
            payload = rule.client_payload(self._state, replace(spec, version=0))
            stepped = rule.client_step(local, payload, BaseCache())
            for module in spec.ranks:
                updates[module].append(stepped.effective_delta(module).double() - before[module])
        return updates


def pure_client(
    shapes: Mapping[str, tuple[int, int]],
    spec: ClientSpec,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> ClientState:
    """A client of these ranks and scales holding zero factors and the pretrained base, on the
    modules of its ranks (a subset of the global ones, for a rule that allows module subsets),
    on the server's device."""
    return ClientState(
        adapter={
            module: LoRAFactors(
                A=torch.zeros(spec.ranks[module], d_in, dtype=dtype, device=device),
                B=torch.zeros(d_out, spec.ranks[module], dtype=dtype, device=device),
                scale=spec.scales[module],
            )
            for module, (d_out, d_in) in shapes.items()
            if module in spec.ranks
        }
    )


def state_dtype(state: GlobalState) -> torch.dtype:
    """The dtype the server's state is in (that of its global factors)."""
    return next(iter(state.factors.values())).U.dtype
