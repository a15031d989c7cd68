"""FLoRA: stack the clients' factors, merge the stack into the base, start a fresh adapter.

The server stacks A_g = [p_1 s_1 A_1; ...; p_K s_K A_K] and B_g = [B_1 ... B_K] (weights and scales on
the rows of A, B unscaled, the stack at scale 1), so B_g A_g = sum_i p_i s_i B_i A_i = dW*: exact for
any mix of ranks. Every client merges B_g A_g into its base and re-initialises its adapter (A random,
B = 0) each round, so the stacked rank never grows. Clients that skipped rounds receive the stacks of
every round since the version they hold.

Module subsets: clients may adapt different subsets of the modules. Module m's stack is then built
from T_m, the clients that trained it, with the weights p_i / P_m (P_m = sum_{T_m} p_i), so its
product is dW*_m = sum_{T_m} p_i / P_m s_i B_i A_i; a module nobody trained gets a zero change. A
client receives the stacks of every module and fresh adapters for the modules it adapts: exact per
module.
"""

from __future__ import annotations

import zlib
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fedlora.errors import InvalidUpdateError
from fedlora.lora.adapter import Adapter, LoRAFactors
from fedlora.lora.client_state import ClientState, fresh_lora_A
from fedlora.lora.lowrank import LowRank
from fedlora.lora.updates import (
    ClientUpdate,
    ClientUpdates,
    average_head,
    example_weights,
    moved_like,
)
from fedlora.lora.versioning import BaseCache, ChangeLog, accumulated_changes
from fedlora.rules.base import (
    AggregationRule,
    ClientSpec,
    GlobalState,
    RoundResult,
    TrainerReferenceNorms,
    any_update_tensor,
    zero_update,
)
from fedlora.rules.reconstruction import ReconstructedUpdates, rank_classes
from fedlora.rules.robust import Robustness
from fedlora.wire.messages import (
    FRESH_ADAPTER_SEED_KEY,
    FROM_VERSION_KEY,
    VERSION_KEY,
    Payload,
    change_from_tensors,
    change_to_tensors,
    rank_key,
    ranks_in,
    scale_key,
    to_wire,
)

if TYPE_CHECKING:
    from fedlora.config import RunConfig


def stack_adapters(updates: list[ClientUpdate], weights: Tensor, module: str) -> LowRank:
    """B_g = [B_1 ... B_K] and A_g = [p_1 s_1 A_1; ...; p_K s_K A_K], in one concatenation each."""
    batch = ClientUpdates.of(updates)
    factors = [update.modules[module] for update in batch]
    B = torch.cat([f.B for f in factors], dim=1)
    A = torch.cat([f.A for f in factors], dim=0)
    client = batch.client_index(module, A.device)
    scales = torch.tensor([f.scale for f in factors], dtype=A.dtype).to(A.device, non_blocking=True)
    return LowRank(B, A * (moved_like(weights, A) * scales)[client][:, None])


class FLoRA(AggregationRule):
    name = "flora"
    exact = True
    allows_module_subsets = True
    client_dp_refusal = (
        "it stacks every client's B_i and p_i s_i A_i, whose product is the client's whole change"
    )

    def __init__(self, seed: int = 0, robustness: Robustness | None = None):
        super().__init__(robustness)
        self.seed = seed

    @classmethod
    def options_from(cls, config: RunConfig) -> dict:
        """``seed`` of the fresh adapters' A: the run's seed."""
        return {"seed": config.seed}

    def client_starts(self, state: GlobalState) -> dict[str, LowRank | None]:
        """FLoRA's clients start every round from B = 0: a zero product."""
        return dict.fromkeys(state.modules)

    def init_state(self, initial: Adapter, head=None) -> GlobalState:
        """FLoRA's adapters start each round at B = 0: only the shapes and the head matter."""
        return GlobalState(
            version=0,
            shapes={module: f.shape for module, f in initial.items()},
            head=dict(head or {}),
            changes=ChangeLog(),
        )

    def _aggregate(
        self, state: GlobalState, updates: list[ClientUpdate], weights: Tensor
    ) -> RoundResult:
        batch = ClientUpdates.of(updates)
        change = {}
        for module in state.modules:
            trainers = batch.trainers(module)
            change[module] = (
                stack_adapters(trainers, example_weights(trainers), module)
                if trainers
                else zero_update(state.shapes[module], any_update_tensor(batch))
            )
        reference = TrainerReferenceNorms(dict.fromkeys(state.modules), batch)
        new_state = GlobalState(
            version=state.version + 1,
            shapes=state.shapes,
            head=average_head(updates, weights) or state.head,
            changes=state.changes.appended(change),
        )
        dtype = next(iter(change.values())).U.dtype
        reconstructed = ReconstructedUpdates(self, state, new_state, rank_classes(updates), dtype)
        return RoundResult(new_state, change, change, reference, reconstructed)

    def global_delta(self, state: GlobalState, module: str) -> LowRank:
        return accumulated_changes(state, module)

    def client_payload(self, state: GlobalState, spec: ClientSpec) -> Payload:
        from_version, change = state.changes.since(spec.version)
        config = {
            VERSION_KEY: state.version,
            FROM_VERSION_KEY: from_version,
            FRESH_ADAPTER_SEED_KEY: self.seed * 1_000_003 + state.version,
        }
        for module in state.modules:
            if module not in spec.ranks:
                continue
            config[rank_key(module)] = spec.ranks[module]
            config[scale_key(module)] = float(spec.scales[module])
        return Payload(
            head={name: to_wire(t) for name, t in state.head.items()},
            base_change=change_to_tensors(change),
            config=config,
        )

    def client_step(
        self, local: ClientState, payload: Payload, cache: BaseCache | None = None
    ) -> ClientState:
        """Merge every pending stack into the shared base, then start a fresh adapter (B = 0).

        The payload names the modules (``rank.{module}``) but not their shapes, which come from
        the client's adapter: a client state without one of them is refused.
        """
        if cache is None:
            raise ValueError("FLoRA's client step needs the worker's BaseCache")
        config = payload.config
        missing = sorted(set(ranks_in(config)) - set(local.adapter))
        if missing:
            raise InvalidUpdateError(
                f"FLoRA's client step builds the fresh adapter in the shapes of the client's own; "
                f"the client state has no adapter for modules {missing}"
            )
        cache.catch_up(
            change_from_tensors(payload.base_change),
            int(config[FROM_VERSION_KEY]),
            int(config[VERSION_KEY]),
        )
        adapter: Adapter = {}
        base_shift: dict[str, Tensor] = {}
        for module, old in local.adapter.items():
            rank, (d_out, d_in) = int(config[rank_key(module)]), old.shape
            seed = int(config[FRESH_ADAPTER_SEED_KEY]) + zlib.crc32(module.encode())
            A = fresh_lora_A(rank, d_in, seed, dtype=old.A.dtype, device=old.A.device)
            adapter[module] = LoRAFactors(
                A=A, B=A.new_zeros(d_out, rank), scale=float(config[scale_key(module)])
            )
            base_shift[module] = cache.shift_of(module, A.new_zeros(d_out, d_in)).to(old.A.dtype)
        head = {name: t.to(local_dtype(local)) for name, t in payload.head.items()} or local.head
        return replace(local, adapter=adapter, base_shift=base_shift, head=head)


def local_dtype(local: ClientState) -> torch.dtype:
    return next(iter(local.adapter.values())).A.dtype
