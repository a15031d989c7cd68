"""FlexLoRA: truncated SVD of the averaged products, best rank-r_i factors per client.

The server forms T = sum_i p_i s_i B_i A_i (the clients' full products, as stacked folded factors) and
keeps its best rank-r approximation at the global rank r, T ~ P diag(S) Q^T, never forming a dense
product, batched over the modules of one shape. Two paths (``svd``):

- "exact": QR of the stacked B and of the stacked A^T, then the SVD of the small (sum_i r_i)^2 core
  (`fedlora.lora.lowrank.exact_truncated_svd`): exact up to round-off at any total rank, at a cost
  growing as (d_out + d_in) (sum_i r_i)^2;
- "randomized": randomized subspace iteration on the factors
  (`fedlora.lora.lowrank.randomized_truncated_svd`), exact only while the stack's inner rank sum_i r_i is
  at most r + ``oversample``; beyond, each power step shrinks the excess error over the optimal
  truncation (about 1e-3 of it), at a cost growing as (d_out + d_in) (sum_i r_i) (r + oversample).
- "auto" (the default): exact while sum_i r_i <= 4 (r + ``oversample``), randomized beyond, where
  the exact path is measurably slower (13x at 100 clients of rank 16 on 4096 x 4096 modules on the
  CPU, 1.2x at 10; docs/benchmarks.md).

The singular values are split evenly, U = P sqrt(S) and V = sqrt(S) Q^T, so the leading r_i
columns/rows are the best rank-r_i factors; client i receives them with its own sqrt(s_i) divided out
(Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client
Resources"). Not exact: the truncation drops the tail of the spectrum. Robust options: norm bounding
only (the SVD is of the product average, which a factor median would leave poisoned).
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fedlora.errors import ConfigError
from fedlora.lora.lowrank import (
    LowRank,
    exact_truncated_svd,
    pad_cols,
    pad_rows,
    randomized_truncated_svd,
)
from fedlora.lora.updates import ClientUpdate, moved_like
from fedlora.rules.base import concatenate_folded
from fedlora.rules.fedavg import FedAvg
from fedlora.rules.robust import Robustness

if TYPE_CHECKING:
    from fedlora.config import RunConfig

SVD_PATHS = ("auto", "exact", "randomized")
EXACT_WIDTH_MULTIPLE = 4
"""``svd="auto"``: the exact path up to this multiple of the randomized sketch's width."""


class FlexLoRA(FedAvg):
    """FlexLoRA's SVD redistribution.

    Parameters
    ----------
    svd : str, default "auto"
        "exact" (QR of the stacked factors and an SVD of the core), "randomized", or "auto": exact
        while the stack's inner rank is at most ``EXACT_WIDTH_MULTIPLE`` (r + oversample).
    oversample : int, default 32
        Randomized path: extra sketch columns beyond the global rank.
    iterations : int, default 4
        Power steps of the subspace iteration (on a flat spectrum of 100 random rank-16 clients,
        4 steps with oversample 32 leave an excess Frobenius error about 1e-3 of the optimal one).
    seed : int, default 0
        Seed of the Gaussian sketch.
    robustness : Robustness, optional
        Norm bounding of each client's change (`fedlora.rules.robust`).
    """

    name = "flexlora"
    takes_server_optimizer = False
    exact = False
    combinations = ("mean",)
    client_dp_refusal = "it takes a truncated SVD of the sum of the clients' products B_i A_i"

    def __init__(
        self,
        svd: str = "auto",
        oversample: int = 32,
        iterations: int = 4,
        seed: int = 0,
        robustness: Robustness | None = None,
    ):
        super().__init__(robustness)
        if oversample < 0 or iterations < 0:
            raise ConfigError(
                f"FlexLoRA needs oversample >= 0 and iterations >= 0; got {oversample}, {iterations}"
            )
        if svd not in SVD_PATHS:
            raise ConfigError(f"FlexLoRA's svd = {svd!r}: choose one of {list(SVD_PATHS)}")
        self.svd, self.oversample, self.iterations, self.seed = svd, oversample, iterations, seed

    @classmethod
    def options_from(cls, config: RunConfig) -> dict:
        """``seed`` of the Gaussian sketch: the run's seed."""
        return {"seed": config.seed}

    def _average_factors(self, state, updates, weights) -> dict:
        products = {module: averaged_product(updates, weights, module) for module in state.modules}
        groups: dict[tuple, list[str]] = defaultdict(list)
        for module, product in products.items():
            groups[(product.U.shape, product.V.shape, state.top_rank(module))].append(module)
        factors = {}
        for (_, _, rank), modules in groups.items():
            U = torch.stack([products[m].U for m in modules])
            V = torch.stack([products[m].V for m in modules])
            if self.exact_path(U.shape[-1], rank):
                P, S, Q = exact_truncated_svd(U, V, rank)
            else:
                P, S, Q = randomized_truncated_svd(
                    U, V, rank, self.oversample, self.iterations, self.seed
                )
            for index, module in enumerate(modules):
                factors[module] = balanced_truncation(P[index], S[index], Q[index], rank)
        return factors

    def exact_path(self, inner_rank: int, rank: int) -> bool:
        """Whether a stack of this inner rank takes the exact SVD."""
        if self.svd == "auto":
            return inner_rank <= EXACT_WIDTH_MULTIPLE * (rank + self.oversample)
        return self.svd == "exact"


def averaged_product(updates: list[ClientUpdate], weights: Tensor, module: str) -> LowRank:
    """sum_i p_i s_i B_i A_i as stacked folded factors [sqrt(s_i) B_i], [p_i sqrt(s_i) A_i]."""
    c = concatenate_folded(updates, module)
    p = moved_like(weights, c.V)[c.client]
    return LowRank(c.U, c.V * p[:, None])


def balanced_truncation(P: Tensor, S: Tensor, Q: Tensor, rank: int) -> LowRank:
    """P sqrt(S), sqrt(S) Q^T, zero-padded to ``rank`` where the stack had fewer directions."""
    root = S.sqrt()
    return LowRank(pad_cols(P * root, rank), pad_rows(root[:, None] * Q.T, rank))
