"""A dense, brute-force federation of pure clients, to check the rules against the ideal update.

Each client holds a `ClientState`; "training" perturbs its adapter at random. The ideal update is
computed densely here, from the clients' own weights, independently of the rules' factor algebra.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedlora.lora.adapter import LoRAFactors, TrainedB, lora_scale
from fedlora.lora.client_state import ClientState
from fedlora.lora.updates import ClientUpdate
from fedlora.lora.versioning import BaseCache
from fedlora.rules import AggregationRule, ClientSpec


def effective(local: ClientState, module: str) -> Tensor:
    """base shift + s B A, written out densely."""
    factors = local.adapter[module]
    delta = factors.scale * (factors.B @ factors.A)
    return local.base_shift.get(module, torch.zeros_like(delta)) + delta


@dataclass
class Federation:
    rule: AggregationRule
    shapes: dict[str, tuple[int, int]]
    ranks: list[int]
    counts: list[int]
    alpha: float = 16.0
    rslora: bool = False
    dtype: torch.dtype = torch.float64
    shared_cache: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)
        top = max(self.ranks)
        initial = {
            m: LoRAFactors(
                A=self.randn(top, d_in) / d_in**0.5,
                B=torch.zeros(d_out, top, dtype=self.dtype),
                scale=lora_scale(self.alpha, top, self.rslora),
            )
            for m, (d_out, d_in) in self.shapes.items()
        }
        self.state = self.rule.init_state(initial)
        self.locals = [
            ClientState(
                adapter={
                    m: LoRAFactors(
                        A=torch.zeros(r, d_in, dtype=self.dtype),
                        B=torch.zeros(d_out, r, dtype=self.dtype),
                        scale=lora_scale(self.alpha, r, self.rslora),
                    )
                    for m, (d_out, d_in) in self.shapes.items()
                }
            )
            for r in self.ranks
        ]
        worker = BaseCache()
        self.caches = [worker if self.shared_cache else BaseCache() for _ in self.ranks]

    def randn(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.generator, dtype=torch.float64).to(self.dtype)

    def spec(self, i: int) -> ClientSpec:
        r = self.ranks[i]
        return ClientSpec(
            ranks=dict.fromkeys(self.shapes, r),
            scales=dict.fromkeys(self.shapes, lora_scale(self.alpha, r, self.rslora)),
            version=self.caches[i].version,
        )

    def receive(self, i: int) -> None:
        payload = self.rule.client_payload(self.state, self.spec(i))
        self.locals[i] = self.rule.client_step(self.locals[i], payload, self.caches[i])

    def train(self, i: int) -> ClientUpdate:
        """Perturb the client's factors (only B where the rule freezes A); its reply."""
        trained = {}
        for m, f in self.locals[i].adapter.items():
            A = f.A + 0.3 * self.randn(*f.A.shape) if self.rule.trains_A else f.A
            trained[m] = LoRAFactors(A=A, B=f.B + 0.3 * self.randn(*f.B.shape), scale=f.scale)
        self.locals[i].adapter = trained
        if not self.rule.trains_A:
            sent = {m: TrainedB(f.B, f.scale) for m, f in trained.items()}
            return ClientUpdate(str(i), self.counts[i], sent)
        return ClientUpdate(str(i), self.counts[i], trained)

    def round(self, participants: list[int]) -> dict[str, float]:
        """One round: participants receive, train, and are aggregated; returns the worst relative
        error, over every client (participant or not) after it applies the new payload, against
        W_{t-1} + sum_i p_i dW_i computed densely."""
        before, updates = {}, []
        for i in participants:
            self.receive(i)
            before[i] = {m: effective(self.locals[i], m) for m in self.shapes}
            updates.append(self.train(i))
        total = sum(self.counts[i] for i in participants)
        ideal, reference = {}, {}
        for m in self.shapes:
            changes = [effective(self.locals[i], m) - before[i][m] for i in participants]
            weights = [self.counts[i] / total for i in participants]
            ideal[m] = sum(w * c for w, c in zip(weights, changes))
            reference[m] = sum(
                w * float(torch.linalg.matrix_norm(c)) for w, c in zip(weights, changes)
            )
        previous = {m: before[participants[0]][m] for m in self.shapes}
        self.result = self.rule.aggregate(self.state, updates)
        self.state = self.result.state
        worst = {}
        for i in range(len(self.ranks)):
            self.receive(i)
            for m in self.shapes:
                error = effective(self.locals[i], m) - previous[m] - ideal[m]
                worst[m] = max(
                    worst.get(m, 0.0), float(torch.linalg.matrix_norm(error)) / reference[m]
                )
        self.starts_agree = all(
            float(torch.linalg.matrix_norm(before[i][m] - previous[m]))
            <= 1e-9 * (1 + float(previous[m].norm()))
            for i in participants
            for m in self.shapes
        )
        return worst
