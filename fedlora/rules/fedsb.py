"""Fed-SB: average the r x r matrix R trained between fixed shared factors B and A.

Every client runs W_0 + B R A with the same frozen B (d_out x r) and A (r x d_in), set once by
LoRA-SB's initialisation (`fedlora.lora.fedsb_init`), at scale 1 (alpha = r). Client i trains R_i from
the global R_{t-1}, a client of capacity r_i only the leading r_i x r_i block (`fedlora.models.sb_layer`),
and the server averages R_t = sum_i p_i R_i. Exact for any mix of capacities: B R A is linear in
R, so B (R_t - R_{t-1}) A = sum_i p_i B (R_i - R_{t-1}) A = dW*. R travels in full (r^2 floats per
module) each way; the fixed factors travel once, to a client whose base version is 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import Tensor

from fedlora.errors import ConfigError, InvalidUpdateError
from fedlora.lora.adapter import Adapter, LoRAFactors, SBCore
from fedlora.lora.client_state import ClientState
from fedlora.lora.lowrank import LowRank
from fedlora.lora.updates import ClientUpdate, average_head, moved_like
from fedlora.rules.base import (
    AggregationRule,
    ClientSpec,
    GlobalState,
    NormsOnUse,
    RoundResult,
)
from fedlora.rules.robust import bounded_core, robust_combine, with_modules
from fedlora.wire.messages import (
    SB_A_SUFFIX,
    SB_B_SUFFIX,
    SB_R_SUFFIX,
    VERSION_KEY,
    Payload,
    Scalar,
    checked_capacity,
    modules_with_suffix,
    rank_key,
    to_wire,
)


class FedSB(AggregationRule):
    name = "fedsb"
    exact = True
    update_kind = SBCore
    scaled = False
    combinations = ("mean", "trimmed-mean", "median")
    takes_server_optimizer = True
    client_dp_refusal = None
    initial_training_rounds = 1
    keeps_node_state = True

    def init_state(self, initial: Adapter, head: dict[str, Tensor] | None = None) -> GlobalState:
        """Round 0 from a LoRA adapter: its B and A become the fixed factors and R_0 = s I, so the
        initial model is W_0 + s B A. LoRA-SB's own initialisation goes through
        `init_state_from_factors`.
        """
        fixed = {module: LowRank(f.B, f.A) for module, f in initial.items()}
        cores = {
            module: f.scale * torch.eye(f.rank, dtype=f.A.dtype, device=f.A.device)
            for module, f in initial.items()
        }
        return self.init_state_from_factors(fixed, cores, head)

    def init_state_from_factors(
        self,
        fixed: Mapping[str, LowRank],
        cores: Mapping[str, Tensor],
        head: dict[str, Tensor] | None = None,
    ) -> GlobalState:
        """Round 0 from the fixed factors (U = B, V = A) and R_0 per module (see `SBInit`)."""
        check_initial_factors(fixed, cores)
        return GlobalState(
            version=0,
            shapes={module: f.shape for module, f in fixed.items()},
            head=dict(head or {}),
            cores=dict(cores),
            sb_factors=dict(fixed),
        )

    def _aggregate(
        self, state: GlobalState, updates: list[ClientUpdate], weights: Tensor
    ) -> RoundResult:
        """R_t = sum_i p_i R_i (as R_{t-1} + sum_i p_i (R_i - R_{t-1})), the round's change
        B (R_t - R_{t-1}) A, dW* one term per client, and sum_i p_i ||dW_i|| per module."""
        cores, global_update, ideal, changes, optimizer = {}, {}, {}, {}, {}
        for module in state.modules:
            fixed, previous = state.sb_factors[module], state.cores[module]
            p = moved_like(weights, previous)
            core_changes = (
                torch.stack([u.modules[module].R.to(previous) for u in updates]) - previous
            )
            change = self._combine(core_changes, p)
            stepped, moments = self.server_optimizer.step(
                {module: previous}, {module: change}, state.optimizer
            )
            optimizer.update(moments)
            cores[module] = stepped[module]
            global_update[module] = LowRank(fixed.U, (cores[module] - previous) @ fixed.V)
            ideal[module] = ideal_core_update(fixed, core_changes, p)
            changes[module] = (fixed, core_changes, p)
        new_state = replace(
            state,
            version=state.version + 1,
            cores=cores,
            head=average_head(updates, weights) or state.head,
            optimizer=optimizer,
        )

        def reference(module: str) -> float:
            fixed, core_changes, p = changes[module]
            return float(p @ core_change_norms(fixed, core_changes))

        return RoundResult(new_state, global_update, ideal, NormsOnUse(state.modules, reference))

    def _combine(self, core_changes: Tensor, p: Tensor) -> Tensor:
        """sum_i p_i dR_i, or the configured coordinate-wise median / trimmed mean of the dR_i."""
        robust = self.robustness
        if robust.combination == "mean":
            return torch.tensordot(p, core_changes, dims=1)
        return robust_combine(core_changes, robust.combination, robust.trim_fraction)

    def bounded_updates(self, state: GlobalState, updates) -> list[ClientUpdate]:
        """R_i' = R_{t-1} + c_i (R_i - R_{t-1}) with c_i from ||B dR_i A||_F: exact, R is linear."""
        bounded: list[dict] = [{} for _ in updates]
        for module in state.modules:
            previous = state.cores[module]
            changes = torch.stack([u.modules[module].R.to(previous) for u in updates]) - previous
            norms = core_change_norms(state.sb_factors[module], changes).double()
            shrink = self.robustness.shrink_factors(norms).tolist()
            for i, update in enumerate(updates):
                bounded[i][module] = bounded_core(update.modules[module], previous, shrink[i])
        return [with_modules(update, modules) for update, modules in zip(updates, bounded)]

    def _check_against_state(self, state: GlobalState, updates) -> None:
        """The base's checks (modules, capacities within 1..r), and every R r x r (global r)."""
        super()._check_against_state(state, updates)
        for update in updates:
            for module, core in update.modules.items():
                rank = state.sb_factors[module].inner_rank
                if tuple(core.R.shape) != (rank, rank):
                    raise InvalidUpdateError(
                        f"client {update.client_id!r}: module {module!r} sends R of shape "
                        f"{tuple(core.R.shape)}, the global R is {rank} x {rank}"
                    )

    def reply_shapes(self, state: GlobalState, ranks) -> dict[str, tuple[int, ...]]:
        """The full R (r x r, the global r) per module, whatever the client's capacity."""
        return {
            module + SB_R_SUFFIX: (fixed.inner_rank, fixed.inner_rank)
            for module, fixed in state.sb_factors.items()
        }

    def global_delta(self, state: GlobalState, module: str) -> LowRank:
        """B R_t A."""
        fixed = state.sb_factors[module]
        return LowRank(fixed.U, state.cores[module] @ fixed.V)

    def client_payload(self, state: GlobalState, spec: ClientSpec) -> Payload:
        """R_t in full per module, the client's capacity as ``rank.{module}``, and the fixed
        ``sb_A``/``sb_B`` when the client holds none yet (``spec.version == 0``)."""
        tensors: dict[str, Tensor] = {}
        config: dict[str, Scalar] = {VERSION_KEY: state.version}
        for module in state.modules:
            fixed = state.sb_factors[module]
            config[rank_key(module)] = checked_capacity(
                module, spec.ranks.get(module), fixed.inner_rank
            )
            tensors[module + SB_R_SUFFIX] = to_wire(state.cores[module])
            if spec.version == 0:
                tensors[module + SB_A_SUFFIX] = to_wire(fixed.V)
                tensors[module + SB_B_SUFFIX] = to_wire(fixed.U)
        head = {name: to_wire(t) for name, t in state.head.items()}
        return Payload(adapter=tensors, head=head, config=config)

    def client_step(self, local: ClientState, payload: Payload, cache=None) -> ClientState:
        """Load R_t between the fixed factors (the payload's when sent, else those the client kept),
        so that the client runs W_0 + B R_t A; the head is replaced when sent."""
        modules = modules_with_suffix(payload.adapter, SB_R_SUFFIX)
        if not modules:
            raise InvalidUpdateError("the payload carries no Fed-SB R")
        dtype = client_dtype(local, payload, modules[0])
        adapter, cores = {}, {}
        for module in modules:
            fixed = received_or_kept_factors(local, payload.adapter, module, dtype)
            core = payload.adapter[module + SB_R_SUFFIX].to(dtype)
            if tuple(core.shape) != (fixed.rank, fixed.rank):
                raise InvalidUpdateError(
                    f"module {module!r}: received R of shape {tuple(core.shape)} for fixed "
                    f"factors of rank {fixed.rank}"
                )
            checked_capacity(module, payload.config.get(rank_key(module)), fixed.rank)
            adapter[module], cores[module] = fixed, core
        head = {name: t.to(dtype) for name, t in payload.head.items()} or local.head
        return replace(local, adapter=adapter, cores=cores, head=head)


def ideal_core_update(fixed: LowRank, core_changes: Tensor, p: Tensor) -> LowRank:
    """dW* = sum_i p_i B (R_i - R_{t-1}) A, one term per client.

    U = [B ... B] and V = [p_1 dR_1 A; ...; p_K dR_K A], with dR_i = R_i - R_{t-1}.
    """
    clients, rank, _ = core_changes.shape
    V = (p[:, None, None] * core_changes) @ fixed.V
    return LowRank(fixed.U.repeat(1, clients), V.reshape(clients * rank, -1))


def core_change_norms(fixed: LowRank, core_changes: Tensor) -> Tensor:
    """||B dR_i A||_F per client, from the r x r Grams: ||B dR A||^2 = sum((B^T B dR) * (dR A A^T)).

    Their p-weighted sum is the reference norm: by the triangle inequality it bounds ||dW*||.
    """
    gram_B, gram_A = fixed.U.T @ fixed.U, fixed.V @ fixed.V.T
    squared = torch.sum((gram_B @ core_changes) * (core_changes @ gram_A), dim=(1, 2))
    return squared.clamp_min(0).sqrt()


def client_dtype(local: ClientState, payload: Payload, module: str) -> torch.dtype:
    """The dtype the client holds its factors in, else the one the payload's R travels in."""
    if local.adapter:
        return next(iter(local.adapter.values())).A.dtype
    return payload.adapter[module + SB_R_SUFFIX].dtype


def received_or_kept_factors(
    local: ClientState, tensors: Mapping[str, Tensor], module: str, dtype: torch.dtype
) -> LoRAFactors:
    """The fixed factors (scale 1) from the payload when it carries them, else the client's own."""
    has_A, has_B = module + SB_A_SUFFIX in tensors, module + SB_B_SUFFIX in tensors
    if has_A != has_B:
        raise InvalidUpdateError(f"module {module!r}: the payload carries only one of sb_A, sb_B")
    if has_A:
        A, B = tensors[module + SB_A_SUFFIX].to(dtype), tensors[module + SB_B_SUFFIX].to(dtype)
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise InvalidUpdateError(
                f"module {module!r}: sb_A {tuple(A.shape)} and sb_B {tuple(B.shape)} do not chain"
            )
        return LoRAFactors(A=A, B=B, scale=1.0)
    if module not in local.adapter:
        raise InvalidUpdateError(
            f"module {module!r}: the client holds no fixed factors and the payload carries none "
            "(they are sent to clients of base version 0)"
        )
    return local.adapter[module]


def check_initial_factors(fixed: Mapping[str, LowRank], cores: Mapping[str, Tensor]) -> None:
    """Same modules, R r x r and finite, and non-zero B and A (frozen at zero, they never train)."""
    if set(fixed) != set(cores):
        raise ConfigError(f"fixed factors for modules {sorted(fixed)} but R_0 for {sorted(cores)}")
    for module, factors in fixed.items():
        rank, core = factors.inner_rank, cores[module]
        if tuple(core.shape) != (rank, rank):
            raise ConfigError(
                f"module {module!r}: R_0 of shape {tuple(core.shape)} for fixed factors of "
                f"rank {rank}"
            )
        tensors = {"B": factors.U, "A": factors.V, "R_0": core}
        for name, tensor in tensors.items():
            if not torch.isfinite(tensor).all():
                raise ConfigError(f"module {module!r}: non-finite values in {name}")
        if not factors.U.any() or not factors.V.any():
            raise ConfigError(
                f"module {module!r}: Fed-SB keeps B and A frozen, and a zero factor never trains; "
                "initialise them with fedlora.lora.fedsb_init"
            )
