"""Server optimizers over a rule's aggregated update (Reddi et al., "Adaptive Federated
Optimization", 2021; Hsu et al., 2019, for FedAvgM).

The round's aggregated client change Delta_t = sum_i p_i (x_i - x_{t-1}) is the negative of a
pseudo-gradient; per tensor, element-wise:

- ``sgd`` (FedAvg / FedAvgM): m_t = mu m_{t-1} + Delta_t, x_t = x_{t-1} + eta m_t
  (mu = 0, eta = 1: plain FedAvg of the changes);
- ``adam`` (FedAdam): m_t = b1 m_{t-1} + (1 - b1) Delta_t, v_t = b2 v_{t-1} + (1 - b2) Delta_t^2,
  x_t = x_{t-1} + eta m_t / (sqrt(v_t) + tau);
- ``yogi`` (FedYogi): as FedAdam with v_t = v_{t-1} - (1 - b2) Delta_t^2 sign(v_{t-1} - Delta_t^2).

As in the paper's Algorithm 2, m starts at 0, v at tau^2, and there is no bias correction. Flower's
own FedAvgM/FedAdam/FedYogi strategies aggregate whole ArrayRecords of one shape; here the
optimizer acts on the rule's global tensors (factors of mixed ranks, Fed-SB's R...), so the
rule applies it. The moments are part of the rule's state and of checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fedlora.errors import ConfigError

KINDS = ("sgd", "adam", "yogi")


@dataclass(frozen=True)
class ServerOptimizer:
    """One server optimizer and its hyperparameters (``lr`` is eta, ``eps`` is tau)."""

    kind: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-3

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"server-optimizer = {self.kind!r}: choose one of {list(KINDS)}")
        if not 0 < self.lr < float("inf"):
            raise ConfigError(f"server-lr must be positive and finite, got {self.lr}")
        for name in ("momentum", "beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"server-{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.eps > 0:
            raise ConfigError(f"server-eps must be positive, got {self.eps}")

    @property
    def is_plain_average(self) -> bool:
        """SGD at lr 1 without momentum: x_t = x_{t-1} + Delta_t, no state."""
        return self.kind == "sgd" and self.lr == 1.0 and self.momentum == 0.0

    def step(
        self,
        params: Mapping[str, Tensor],
        deltas: Mapping[str, Tensor],
        moments: Mapping[str, Tensor],
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The new tensors and moments (``{name}.m``, ``{name}.v``) for the aggregated changes
        ``deltas`` of ``params`` (same keys and shapes); nothing is modified in place."""
        new_params, new_moments = {}, {}
        for name, x in params.items():
            delta = deltas[name].to(x)
            if self.is_plain_average:
                new_params[name] = x + delta
                continue
            m = moments.get(f"{name}.m", torch.zeros_like(x))
            if self.kind == "sgd":
                m = self.momentum * m + delta
                new_params[name] = x + self.lr * m
                new_moments[f"{name}.m"] = m
                continue
            v = moments.get(f"{name}.v", torch.full_like(x, self.eps**2))
            m = self.beta1 * m + (1 - self.beta1) * delta
            squared = delta * delta
            if self.kind == "adam":
                v = self.beta2 * v + (1 - self.beta2) * squared
            else:
                v = v - (1 - self.beta2) * squared * torch.sign(v - squared)
            new_params[name] = x + self.lr * m / (v.sqrt() + self.eps)
            new_moments[f"{name}.m"], new_moments[f"{name}.v"] = m, v
        return new_params, new_moments
