"""FSLoRA (Federated Sketching LoRA, Fang et al. 2025): each client trains a random sketch of the
global LoRA's rank components.

The server keeps a global rank-r LoRA (folded factors U = sqrt(s) B, V = sqrt(s) A). In round t
client i of capacity m_i <= r draws, per module, an index set I_i of m_i of the r components
(uniformly, from the rule's seed, the round, the client and the module: reproducible; every
client's set of a module is drawn in one batch, `sketch_indices`), i.e. the
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
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from fedlora.errors import InvalidUpdateError
from fedlora.lora.adapter import LoRAFactors
from fedlora.lora.client_state import ClientState
from fedlora.lora.lowrank import LowRank, frobenius_norms
from fedlora.lora.updates import (
    ClientUpdate,
    ClientUpdates,
    ConcatenatedFactors,
    average_head,
    moved_like,
)
from fedlora.rules.base import (
    ClientSpec,
    GlobalState,
    NormsOnUse,
    RoundResult,
    SeededRule,
    difference,
    load_adapter,
    padded_per_client,
    weighted_sum,
)
from fedlora.wire.messages import VERSION_KEY, Payload, adapter_config, adapter_to_tensors, to_wire

MASK_32 = 0xFFFFFFFF
GOLDEN_32 = 0x9E3779B9


def times_32(x: Tensor, constant: int) -> Tensor:
    """x * constant mod 2^32 for 32-bit values in int64, without overflowing it (16-bit halves)."""
    high, low = constant >> 16, constant & 0xFFFF
    return (x * low + (((x * high) & 0xFFFF) << 16)) & MASK_32


def mix_32(x: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finaliser (a bijection of 32-bit values with full avalanche)."""
    x = x ^ (x >> 16)
    x = times_32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = times_32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def sketch_indices(
    seed: int,
    version: int,
    clients: Sequence[str],
    module: str,
    rank: int,
    sizes: Sequence[int],
) -> Tensor:
    """The components each client trains in the round after ``version``: for client i a uniform
    subset of ``sizes[i]`` of the ``rank`` components, sorted, all clients' subsets concatenated.

    Client i's key k_i = crc32(seed, version, client, module) orders the components by the hash
    h(k_i, j) = mix(mix(k_i) + (j + 1) phi mod 2^32), distinct over j (mix is a bijection, phi odd):
    a pseudo-random permutation, of which the client takes the first m_i. One batch per module,
    and a client's subset does not depend on the other clients.
    """
    for size in sizes:
        if not 0 < size <= rank:
            raise InvalidUpdateError(
                f"module {module!r}: sketch of {size} components outside 1..{rank}"
            )
    keys = torch.tensor(
        [zlib.crc32(f"{seed}:{version}:{client}:{module}".encode()) for client in clients]
    )
    steps = (torch.arange(1, rank + 1) * GOLDEN_32) & MASK_32
    hashes = mix_32((mix_32(keys)[:, None] + steps) & MASK_32)
    places = hashes.argsort(dim=1).argsort(dim=1)
    chosen = places < torch.tensor(list(sizes))[:, None]
    return chosen.nonzero()[:, 1]


class FSLoRA(SeededRule):
    name = "fslora"
    exact = False
    bounds_norms = False
    takes_server_optimizer = True
    client_dp_refusal = (
        "its clients train sketched sub-blocks at r / m_i and no sensitivity is derived for the "
        "mapped-back changes"
    )

    def sketches(
        self, state: GlobalState, clients: Sequence[str], module: str, sizes: Sequence[int]
    ) -> Tensor:
        """The clients' index sets I_i of ``module``, concatenated (`sketch_indices`)."""
        return sketch_indices(
            self.seed, state.version, clients, module, state.top_rank(module), sizes
        )

    def sub_block(self, state: GlobalState, client: str, module: str, size: int) -> LowRank:
        """sqrt(r / m) (U[:, I], V[I]): the client's folded factors of its sketched model."""
        folded = state.factors[module]
        index = self.sketches(state, [client], module, [size]).to(folded.U.device)
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
        """Per module, in one batch over the clients: the trained sub-blocks U_i', V_i', their
        starts S_i = sqrt(r / m_i) (U[:, I_i], V[I_i]) and Delta = sum_i p_i pad_{I_i}(U_i' - S_U_i)
        / sqrt(r / m_i) (likewise V), scattered with one index_add per factor."""
        batch = ClientUpdates.of(updates)
        clients = [update.client_id for update in batch]
        params, deltas, ideal, sketched = {}, {}, {}, {}
        for module in state.modules:
            folded = state.factors[module]
            sizes = batch.ranks(module)
            trained = batch.concatenated(module)
            device, dtype = folded.U.device, folded.U.dtype
            index = self.sketches(state, clients, module, sizes).to(device, non_blocking=True)
            roots = torch.tensor([math.sqrt(folded.inner_rank / m) for m in sizes], dtype=dtype)
            root = roots.to(device, non_blocking=True)[trained.client]
            p = moved_like(weights, folded.U)[trained.client]
            start_U, start_V = folded.U[:, index] * root, folded.V[index] * root[:, None]
            U, V = trained.U.to(dtype), trained.V.to(dtype)
            step = p / root
            deltas[f"{module}.U"] = torch.zeros_like(folded.U).index_add_(
                1, index, (U - start_U) * step
            )
            deltas[f"{module}.V"] = torch.zeros_like(folded.V).index_add_(
                0, index, (V - start_V) * step[:, None]
            )
            params[f"{module}.U"], params[f"{module}.V"] = folded.U, folded.V
            ideal[module] = LowRank(
                torch.cat([U, start_U], dim=1), torch.cat([V * p[:, None], -start_V * p[:, None]])
            )
            sketched[module] = (trained, U, V, start_U, start_V, max(sizes))
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

        def reference(module: str) -> float:
            return weighted_sum(weights, sketch_change_norms(*sketched[module]))

        return RoundResult(new_state, update, ideal, NormsOnUse(state.modules, reference))


def sketch_change_norms(
    trained: ConcatenatedFactors, U: Tensor, V: Tensor, start_U: Tensor, start_V: Tensor, rank: int
) -> Tensor:
    """||U_i' V_i' - S_U_i S_V_i||_F per client, from the batched Grams of its 2 m_i columns
    (zero-padded to 2 max m): ||X Y||^2 = <X^T X, Y Y^T>. ``U``, ``V``: the trained sub-blocks of
    ``trained`` in the state's dtype."""
    left = torch.cat(
        [
            padded_per_client(U.T, trained, rank),
            padded_per_client(-start_U.T, trained, rank),
        ],
        dim=1,
    )
    right = torch.cat(
        [
            padded_per_client(V, trained, rank),
            padded_per_client(start_V, trained, rank),
        ],
        dim=1,
    )
    return frobenius_norms(left.mT, right)
