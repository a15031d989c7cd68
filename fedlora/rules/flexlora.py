"""FlexLoRA: truncated SVD of the averaged products, best rank-r_i factors per client.

The server forms T = sum_i p_i s_i B_i A_i (the clients' full products, as stacked folded factors) and
keeps its best rank-r approximation at the global rank r, T ~ P diag(S) Q^T, from a QR of the stacked
factors and an SVD of the small core (`fedlora.lowrank.truncated_svd`, never a dense product). The
singular values are split evenly, U = P sqrt(S) and V = sqrt(S) Q^T, so the leading r_i columns/rows
are the best rank-r_i factors; client i receives them with its own sqrt(s_i) divided out (Bai et al.,
"Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client Resources").
Not exact: the truncation drops the tail of the spectrum.
"""

from __future__ import annotations

from torch import Tensor

from fedlora.lowrank import LowRank, pad_cols, pad_rows, stack, truncated_svd
from fedlora.rules.fedavg import FedAvg
from fedlora.updates import ClientUpdate


class FlexLoRA(FedAvg):
    name = "flexlora"
    exact = False

    def _average_factors(self, state, updates, weights) -> dict:
        return {
            module: balanced_truncation(
                averaged_product(updates, weights, module), state.top_rank(module)
            )
            for module in state.modules
        }


def averaged_product(updates: list[ClientUpdate], weights: Tensor, module: str) -> LowRank:
    """sum_i p_i s_i B_i A_i as stacked folded factors [sqrt(s_i) B_i], [p_i sqrt(s_i) A_i]."""
    terms = []
    for update, p in zip(updates, weights.tolist()):
        folded = update.modules[module].folded()
        terms.append(LowRank(folded.U, folded.V * p))
    return stack(terms)


def balanced_truncation(target: LowRank, rank: int) -> LowRank:
    """P sqrt(S), sqrt(S) Q^T of the best rank-``rank`` approximation, zero-padded to ``rank``."""
    P, S, Q = truncated_svd(target, rank)
    root = S.sqrt()
    return LowRank(pad_cols(P * root, rank), pad_rows(root[:, None] * Q.T, rank))
