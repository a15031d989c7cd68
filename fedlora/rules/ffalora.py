"""FFA-LoRA: freeze A from a shared seed, train and federate B only.

Every client's A is the leading r_i rows of one top-rank A drawn from the run's seed, never trained
and never sent. The global model is W_t = W_0 + G_t A with G (d_out x r) the global coefficient of
A's rows; client i starts from B_i0 = G[:, :r_i] / s_i, so its change is
dW_i = (s_i B_i - G[:, :r_i]) A[:r_i], linear in B. The server sets

    G_t = G_{t-1} + sum_i p_i pad(s_i B_i - G_{t-1}[:, :r_i]),

so G_t A = W_{t-1} + dW*: exact for any mix of ranks (with equal ranks, the plain average of s B_i).
The change is applied through the server optimizer (`fedlora.lora.server_optimizer`; SGD at lr 1 is the
rule above, any other is measured against dW*).

Mixed ranks: the tail as a base change. A client below the top rank would run G[:, :r_i] A[:r_i]
and miss G[:, r_i:] A[r_i:]; it receives the tail columns G[:, r_i:] and, drawing A's tail rows
from the same seed, puts G[:, r_i:] A[r_i:] into its base, so every client runs W_t exactly. The
tail costs d_out (r - r_i) floats down and nothing up.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from fedlora.errors import InvalidUpdateError
from fedlora.lora.adapter import Adapter, LoRAFactors, TrainedB
from fedlora.lora.client_state import ClientState, fresh_lora_A, module_seed
from fedlora.lora.lowrank import LowRank
from fedlora.lora.updates import ClientUpdate, ClientUpdates, average_head, moved_like
from fedlora.rules.base import (
    ClientSpec,
    GlobalState,
    RoundResult,
    SeededRule,
    client_change_norms_per_client,
    concatenate_folded,
    ideal_and_reference,
    start_coverage,
)
from fedlora.rules.reconstruction import ReconstructedUpdates, rank_classes
from fedlora.rules.robust import with_modules
from fedlora.wire.messages import (
    B_SUFFIX,
    B_TAIL_SUFFIX,
    FROZEN_A_SEED_KEY,
    VERSION_KEY,
    Payload,
    modules_with_suffix,
    rank_key,
    scale_key,
    to_wire,
)


def frozen_A(
    seed: int,
    module: str,
    rank: int,
    d_in: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The module's frozen A at ``rank``: peft's initialisation drawn from (seed, module path), as
    `fedlora.models.base_model.with_lora` seeds every client (a lower rank's A is its leading rows)."""
    return fresh_lora_A(rank, d_in, module_seed(seed, module), dtype=dtype, device=device)


class FFALoRA(SeededRule):
    name = "ffalora"
    exact = True
    update_kind = TrainedB
    trains_A = False
    takes_server_optimizer = True
    client_dp_refusal = None
    dp_scale_power = 1.0

    def client_reply(self, trained: Adapter, lora_alpha: float, rslora: bool) -> dict:
        """Only B (with its scale) leaves the client: A is frozen from the seed."""
        return {module: TrainedB(B=f.B, scale=f.scale) for module, f in trained.items()}

    def init_state(self, initial: Adapter, head=None) -> GlobalState:
        """G_0 = s B_0 of the initial adapter; A is drawn from the seed (the initial adapter's A
        is replaced by it, as every client's is)."""
        factors = {}
        for module, f in initial.items():
            A = frozen_A(self.seed, module, f.rank, f.shape[1], f.A.dtype, f.B.device)
            factors[module] = LowRank(f.scale * f.B, A)
        return GlobalState(
            version=0,
            shapes={module: f.shape for module, f in initial.items()},
            factors=factors,
            head=dict(head or {}),
        )

    def completed_updates(self, state: GlobalState, updates) -> list[ClientUpdate]:
        """Each client's B with its frozen A = the leading rows of the global A."""
        completed = []
        for update in updates:
            modules = {
                module: LoRAFactors(
                    A=state.factors[module].V[: b.rank].to(b.B), B=b.B, scale=b.scale
                )
                for module, b in update.modules.items()
            }
            completed.append(replace(update, modules=modules))
        return completed

    def bounded_updates(self, state: GlobalState, updates) -> list[ClientUpdate]:
        """B_i' = B_i0 + c_i (B_i - B_i0), c_i = min(1, bound / ||dW_i||): exact, dW_i is linear
        in B."""
        bounded: list[dict] = [{} for _ in updates]
        for module in state.modules:
            start = state.factors[module]
            norms = client_change_norms_per_client(start, updates, module).double()
            shrink = self.robustness.shrink_factors(norms).tolist()
            for i, update in enumerate(updates):
                f = update.modules[module]
                B0 = start.U[:, : f.rank].to(f.B) / f.scale
                bounded[i][module] = replace(f, B=B0 + shrink[i] * (f.B - B0))
        return [with_modules(update, modules) for update, modules in zip(updates, bounded)]

    def _aggregate(
        self, state: GlobalState, updates: list[ClientUpdate], weights: Tensor
    ) -> RoundResult:
        """sum_i p_i pad(s_i B_i) - c G (c_k: the weight of the clients that started from column
        k, `start_coverage`), from the concatenated sqrt(s_i) B_i with one index_add per module."""
        batch = ClientUpdates.of(updates)
        coefficients, changes = {}, {}
        for module in state.modules:
            G = state.factors[module].U
            coverage = moved_like(start_coverage(batch, weights, module, G.shape[1]), G)
            c = concatenate_folded(batch, module)
            factor = moved_like(weights, G)[c.client] * c.roots.to(G)
            change = (-coverage * G).index_add_(1, c.position, c.U.to(G) * factor)
            coefficients[module], changes[module] = G, change
        stepped, moments = self.server_optimizer.step(coefficients, changes, state.optimizer)
        factors, global_update = {}, {}
        for module in state.modules:
            G, A = state.factors[module].U, state.factors[module].V
            factors[module] = LowRank(stepped[module], A)
            global_update[module] = LowRank(stepped[module] - G, A)
        ideal, reference = ideal_and_reference(state.factors, updates, weights)
        head = average_head(updates, weights) or state.head
        new_state = replace(
            state, version=state.version + 1, factors=factors, head=head, optimizer=moments
        )
        dtype = next(iter(factors.values())).U.dtype
        reconstructed = ReconstructedUpdates(self, state, new_state, rank_classes(updates), dtype)
        return RoundResult(new_state, global_update, ideal, reference, reconstructed)

    def client_payload(self, state: GlobalState, spec: ClientSpec) -> Payload:
        """B_i0 = G[:, :r_i] / s_i and, below the top rank, the tail G[:, r_i:]; the seed of A."""
        adapter, config = {}, {VERSION_KEY: state.version, FROZEN_A_SEED_KEY: self.seed}
        for module, global_factors in state.factors.items():
            G, rank, scale = global_factors.U, spec.ranks[module], spec.scales[module]
            if rank > G.shape[1]:
                raise InvalidUpdateError(
                    f"module {module!r}: client rank {rank} above the global rank {G.shape[1]}"
                )
            adapter[module + B_SUFFIX] = to_wire(G[:, :rank] / scale)
            if rank < G.shape[1]:
                adapter[module + B_TAIL_SUFFIX] = to_wire(G[:, rank:])
            config[rank_key(module)] = rank
            config[scale_key(module)] = float(scale)
        head = {name: to_wire(t) for name, t in state.head.items()}
        return Payload(adapter=adapter, head=head, config=config)

    def reply_shapes(self, state: GlobalState, ranks) -> dict[str, tuple[int, ...]]:
        """Only ``lora_B`` (d_out x r) per module: A is frozen."""
        return {
            module + B_SUFFIX: (d_out, ranks[module]) for module, (d_out, _) in state.shapes.items()
        }

    def client_step(self, local: ClientState, payload: Payload, cache=None) -> ClientState:
        """Load B, draw the frozen A from the seed, and put the tail G[:, r_i:] A[r_i:] into the
        base. A module's d_in comes from the client's own adapter: a state without it is refused."""
        config = payload.config
        seed = int(config[FROZEN_A_SEED_KEY])
        adapter: Adapter = {}
        base_shift: dict[str, Tensor] = {}
        for module in modules_with_suffix(payload.adapter, B_SUFFIX):
            if module not in local.adapter:
                raise InvalidUpdateError(
                    f"FFA-LoRA's client step draws A in the shapes of the client's own adapter; "
                    f"the client state has no module {module!r}"
                )
            dtype, d_in = local.adapter[module].A.dtype, local.adapter[module].shape[1]
            B = payload.adapter[module + B_SUFFIX].to(dtype)
            rank = int(config[rank_key(module)])
            if B.ndim != 2 or B.shape[1] != rank:
                raise InvalidUpdateError(
                    f"module {module!r}: declared rank {rank} does not match lora_B {tuple(B.shape)}"
                )
            tail = payload.adapter.get(module + B_TAIL_SUFFIX)
            top = rank + (0 if tail is None else tail.shape[1])
            A = frozen_A(seed, module, top, d_in, dtype, B.device)
            adapter[module] = LoRAFactors(A=A[:rank], B=B, scale=float(config[scale_key(module)]))
            if tail is not None:
                base_shift[module] = tail.to(dtype) @ A[rank:]
        head = {name: t.to(dtype) for name, t in payload.head.items()} or local.head
        return replace(local, adapter=adapter, base_shift=base_shift, head=head)
