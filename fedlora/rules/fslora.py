"""FSLoRA (Federated Sketching LoRA, Fang et al. 2025): each client trains a random sketch of the
global LoRA's rank components.

The server keeps a global rank-r LoRA (folded factors U = sqrt(s) B, V = sqrt(s) A). In round t
client i of capacity m_i <= r draws, per module, an index set I_i of m_i of the r components
(uniformly, from the rule's seed, the round, the client and the module: reproducible), i.e. the
sketch S_i = (r / m_i) diag(1[j in I_i]) with E[S_i] = I. It trains the sketched model
W_0 + U S_i V = W_0 + (r / m_i) U[:, I_i] V[I_i]: a rank-m_i adapter holding the sub-block, its
folded factors sqrt(r / m_i) (U[:, I_i], V[I_i]) (without rsLoRA its own B, A are exactly B[:, I_i],
A[I_i] and peft's alpha / m_i is the paper's (r / m_i) alpha / r). Only the sub-block travels, each
way. Components outside I_i are not on the client and cannot move. The server maps each client's
trained sub-block back, Delta_i = pad_{I_i}(U_i' - U[:, I_i]) (likewise V), aggregates
Delta = sum_i p_i Delta_i and applies it with the server optimizer (SGD at lr 1: U + Delta).

The property the paper's analysis rests on is E[S_i] = I: the sketched model is unbiased,
E[U S V] = U V, and so is a client's first gradient step, E[Delta_i] = the unsketched step (tested
by Monte Carlo). Not exact: clients run the sketched model, not W_{t-1}; the deviation is measured.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import replace

import torch
from torch import Tensor

from fedlora.errors import InvalidUpdateError
from fedlora.lora.adapter import LoRAFactors
from fedlora.lora.client_state import ClientState
from fedlora.lora.lowrank import LowRank, frobenius_norm, stack
from fedlora.lora.updates import ClientUpdate, average_head
from fedlora.rules.base import (
    ClientSpec,
    GlobalState,
    RoundResult,
    SeededRule,
    difference,
    load_adapter,
)
from fedlora.wire.messages import VERSION_KEY, Payload, adapter_config, adapter_to_tensors, to_wire


def sketch_indices(
    seed: int, version: int, client: str, module: str, rank: int, size: int
) -> Tensor:
    """The ``size`` of ``rank`` components client ``client`` trains in the round after
    ``version``: a uniform subset, sorted, drawn from (seed, version, client, module)."""
    if not 0 < size <= rank:
        raise InvalidUpdateError(
            f"module {module!r}: sketch of {size} components outside 1..{rank}"
        )
    generator = torch.Generator().manual_seed(
        zlib.crc32(f"{seed}:{version}:{client}:{module}".encode())
    )
    return torch.randperm(rank, generator=generator)[:size].sort().values


class FSLoRA(SeededRule):
    name = "fslora"
    exact = False
    bounds_norms = False
    takes_server_optimizer = True
    client_dp_refusal = (
        "its clients train sketched sub-blocks at r / m_i and no sensitivity is derived for the "
        "mapped-back changes"
    )

    def sketch(self, state: GlobalState, client: str, module: str, size: int) -> Tensor:
        return sketch_indices(
            self.seed, state.version, client, module, state.top_rank(module), size
        )

    def sub_block(self, state: GlobalState, client: str, module: str, size: int) -> LowRank:
        """sqrt(r / m) (U[:, I], V[I]): the client's folded factors of its sketched model."""
        folded = state.factors[module]
        index = self.sketch(state, client, module, size).to(folded.U.device)
        root = math.sqrt(folded.inner_rank / size)
        return LowRank(folded.U[:, index] * root, folded.V[index] * root)

    def client_payload(self, state: GlobalState, spec: ClientSpec) -> Payload:
        adapter = {}
        for module in state.modules:
            rank, scale = spec.ranks[module], spec.scales[module]
            if rank > state.top_rank(module):
                raise InvalidUpdateError(
                    f"module {module!r}: client rank {rank} above the global rank "
                    f"{state.top_rank(module)}"
                )
            adapter[module] = LoRAFactors.from_folded(
                self.sub_block(state, spec.client, module, rank), rank, scale
            )
        config = {**adapter_config(adapter), VERSION_KEY: state.version}
        head = {name: to_wire(t) for name, t in state.head.items()}
        return Payload(adapter=adapter_to_tensors(adapter), head=head, config=config)

    def client_step(self, local: ClientState, payload: Payload, cache=None) -> ClientState:
        """Load the sub-block as the client's adapter: it holds nothing else of the global LoRA."""
        return load_adapter(local, payload)

    def _aggregate(
        self, state: GlobalState, updates: list[ClientUpdate], weights: Tensor
    ) -> RoundResult:
        params, deltas, ideal, reference = {}, {}, {}, {}
        for module in state.modules:
            folded = state.factors[module]
            r = folded.inner_rank
            delta_U, delta_V = torch.zeros_like(folded.U), torch.zeros_like(folded.V)
            terms, norms = [], []
            for update, p in zip(updates, weights.tolist()):
                trained = update.modules[module].folded()
                m = trained.inner_rank
                index = self.sketch(state, update.client_id, module, m).to(folded.U.device)
                start = self.sub_block(state, update.client_id, module, m)
                root = math.sqrt(r / m)
                delta_U[:, index] += p * (trained.U.to(folded.U) / root - folded.U[:, index])
                delta_V[index] += p * (trained.V.to(folded.V) / root - folded.V[index])
                change = difference(trained.to(folded.U.dtype), start)
                terms.append(LowRank(change.U, p * change.V))
                norms.append(p * float(frobenius_norm(change)))
            params[f"{module}.U"], params[f"{module}.V"] = folded.U, folded.V
            deltas[f"{module}.U"], deltas[f"{module}.V"] = delta_U, delta_V
            ideal[module], reference[module] = stack(terms), sum(norms)
        stepped, moments = self.server_optimizer.step(params, deltas, state.optimizer)
        factors = {m: LowRank(stepped[f"{m}.U"], stepped[f"{m}.V"]) for m in state.modules}
        new_state = replace(
            state,
            version=state.version + 1,
            factors=factors,
            head=average_head(updates, weights) or state.head,
            optimizer=moments,
        )
        update = {m: difference(factors[m], state.factors[m]) for m in state.modules}
        return RoundResult(new_state, update, ideal, reference)
