"""HetLoRA: sparsity-weighted aggregation of zero-padded factors, local rank self-pruning.

Server (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models"):
per module, the zero-padded folded factors are averaged with weights

    w_i = p_i ||s_i B_i A_i||_F / sum_j p_j ||s_j B_j A_j||_F

(norms from Gram matrices; w_i = p_i when every product is zero), so clients whose adapters moved
further count more. Client i receives the leading r_i columns/rows (truncation). Clients may shrink
their rank during local training (`prune_rank`); they then report the smaller rank, with the rank
they received in ``ClientUpdate.start_ranks``. Not exact: the product of averages is not the average
of products.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

from fedlora.lora.adapter import Adapter, LoRAFactors, lora_scale
from fedlora.lora.lowrank import LowRank, frobenius_norm
from fedlora.lora.updates import ClientUpdate
from fedlora.rules.base import client_change_norms_per_client
from fedlora.rules.fedavg import FedAvg

DEFAULT_PRUNE_GAMMA = 0.05
"""Default pruning threshold: a tail is dropped when its norm is below 5% of the head's."""


class HetLoRA(FedAvg):
    name = "hetlora"
    takes_server_optimizer = False
    exact = False
    client_dp_refusal = "its weights p_i ||s_i B_i A_i|| depend on each client's update"
    keeps_node_state = True

    def client_reply(self, trained: Adapter, lora_alpha: float, rslora: bool) -> Adapter:
        """The trained adapter with each module's rank pruned (`prune_rank`), at peft's scale of
        its new rank."""
        return {
            module: at_peft_scale(prune_rank(factors), lora_alpha, rslora)
            for module, factors in trained.items()
        }

    def _average_factors(self, state, updates, weights) -> dict:
        ranks = {module: state.top_rank(module) for module in state.modules}
        sparsity = {module: sparsity_weights(updates, weights, module) for module in state.modules}
        return self._combine(updates, sparsity, ranks)


def sparsity_weights(updates: Sequence[ClientUpdate], weights: Tensor, module: str) -> Tensor:
    """w_i = p_i ||s_i B_i A_i||_F / sum_j p_j ||s_j B_j A_j||_F, or p_i when every norm is zero."""
    norms = client_change_norms_per_client(None, updates, module)
    weighted = weights * norms.to(weights)
    total = weighted.sum()
    return weighted / total if total > 0 else weights


def prune_rank(
    factors: LoRAFactors, gamma: float = DEFAULT_PRUNE_GAMMA, min_rank: int = 1
) -> LoRAFactors:
    """Local rank self-pruning: drop the longest tail of rank components that is negligible.

    Split the adapter at rank k into a head (components 0..k-1) and a tail (k..r-1). The new rank is
    the smallest k >= ``min_rank`` with

        ||s B[:, k:] A[k:]||_F < gamma ||s B[:, :k] A[:k]||_F,

    and r (nothing dropped) when no k < r qualifies; the kept factors and the scale are unchanged.
    gamma = 0 (or a zero adapter) keeps everything. Defaults: gamma = 0.05 (`DEFAULT_PRUNE_GAMMA`),
    min_rank = 1.

    The HetLoRA paper drives the tail towards zero with a penalty on the norm of its product during
    local training and then truncates it; this is the truncation step, with the norm test above.
    """
    folded = factors.folded()
    for rank in range(max(min_rank, 1), factors.rank):
        head = LowRank(folded.U[:, :rank], folded.V[:rank])
        tail = LowRank(folded.U[:, rank:], folded.V[rank:])
        if frobenius_norm(tail) < gamma * frobenius_norm(head):
            return LoRAFactors(A=factors.A[:rank], B=factors.B[:, :rank], scale=factors.scale)
    return factors


def at_peft_scale(factors: LoRAFactors, alpha: float, rslora: bool) -> LoRAFactors:
    """The same product s B A at the scale peft gives the factors' rank (after pruning): the
    folded factors, which the rules average, are unchanged."""
    scale = lora_scale(alpha, factors.rank, rslora)
    root = math.sqrt(factors.scale / scale)
    return LoRAFactors(A=factors.A * root, B=factors.B * root, scale=scale)
