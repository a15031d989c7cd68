"""The real-model proof: federated rounds on peft models, checked against dense brute force.

Clients are LoRA models of mixed ranks (2; 4 with one module at 2; 8 with rsLoRA) on copies of one
pretrained model, the global rank is 8. Each round every client loads its payload through
``rule.client_step`` and `fedlora.models.peft_io`, "trains" (its LoRA factors and head move at random, B
non-zero), and reports a `ClientUpdate` read from its model. The expected models are built from the
clients' own merged weights (peft's ``merge_and_unload`` on copies), independently of the rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch
from torch import Tensor
from torch.nn.functional import pad

from fedlora.lora.adapter import Adapter, SharedA
from fedlora.lora.updates import ClientUpdate
from fedlora.lora.versioning import BaseCache
from fedlora.models.peft_io import (
    apply_client_state,
    client_state_from_model,
    pretrained_weights,
    read_adapter,
    read_head,
)
from fedlora.rules import ClientSpec, make_rule
from tests.support.models import (
    FAMILIES,
    logits,
    merged_state,
    perturb_trainable,
    plain_model,
    plain_state_with,
    token_batch,
    with_lora,
)

TOP_RANK = 8
CLIENTS = (
    {"rank": 2},
    {"rank": 4, "pattern_rank": 2},
    {"rank": 8, "rslora": True},
)

pytestmark = pytest.mark.usefixtures("one_thread")
COUNTS = (30, 50, 20)
TOLERANCE = 1e-10


@dataclass
class RoundRecord:
    """One round seen from outside the rules: every client's merged weights before and after
    training, its trained adapter and head, and the example weights p_i."""

    before: list[dict[str, Tensor]]
    after: list[dict[str, Tensor]]
    adapters: list[Adapter]
    heads: list[dict[str, Tensor]]
    weights: list[float]


class ModelFederation:
    """Clients of one worker running a rule on real peft models; they share one `BaseCache`, and
    each spec carries the version that cache holds when the payload is built."""

    def __init__(self, rule: str, family: str, seed: int = 0):
        self.family = FAMILIES[family]
        self.pretrained = self.family.build()
        self.rule = make_rule(rule)
        top = with_lora(self.pretrained, self.family, TOP_RANK)
        self.state = self.rule.init_state(read_adapter(top), read_head(top))
        self.clients = [with_lora(self.pretrained, self.family, **c) for c in CLIENTS]
        self.specs = [client_spec(read_adapter(model)) for model in self.clients]
        self.cache = BaseCache()
        self.generator = torch.Generator().manual_seed(seed)

    def receive(self, i: int) -> None:
        spec = replace(self.specs[i], version=self.cache.version)
        payload = self.rule.client_payload(self.state, spec)
        model = self.clients[i]
        local = client_state_from_model(model)
        apply_client_state(model, self.rule.client_step(local, payload, self.cache))

    def report(self, i: int) -> ClientUpdate:
        adapter, head = read_adapter(self.clients[i]), read_head(self.clients[i])
        if self.rule.personalized:
            shared = {m: SharedA(A=f.A, scale=f.scale) for m, f in adapter.items()}
            return ClientUpdate(str(i), COUNTS[i], shared)
        return ClientUpdate(str(i), COUNTS[i], adapter, head)

    def round(self) -> RoundRecord:
        """Every client receives, trains and reports; the rule aggregates; every client receives."""
        total = sum(COUNTS)
        record = RoundRecord([], [], [], [], [n / total for n in COUNTS])
        updates = []
        for i, model in enumerate(self.clients):
            self.receive(i)
            record.before.append(merged_state(model))
            perturb_trainable(model, self.generator)
            record.after.append(merged_state(model))
            record.adapters.append(read_adapter(model))
            record.heads.append(read_head(model))
            updates.append(self.report(i))
        self.state = self.rule.aggregate(self.state, updates).state
        for i in range(len(self.clients)):
            self.receive(i)
        return record


def client_spec(adapter: Adapter) -> ClientSpec:
    return ClientSpec(
        ranks={m: f.rank for m, f in adapter.items()},
        scales={m: f.scale for m, f in adapter.items()},
    )


def ideal_state(record: RoundRecord) -> dict[str, Tensor]:
    """W_{t-1} + sum_i p_i (W_i after - W_i before) for every parameter: the adapted weights get
    the ideal update dW*, the head the p-weighted average, frozen parameters stay."""
    start = record.before[0]
    return {
        key: start[key]
        + sum(p * (a[key] - b[key]) for p, a, b in zip(record.weights, record.after, record.before))
        for key in start
    }


def starts_agree(record: RoundRecord) -> bool:
    """Every client started the round from the same effective model W_{t-1}."""
    return all(
        torch.allclose(state[key], record.before[0][key], rtol=0, atol=1e-12)
        for state in record.before
        for key in state
    )


def folded_averages(record: RoundRecord) -> dict[str, tuple[Tensor, Tensor]]:
    """sum_i p_i pad(sqrt(s_i) B_i), sum_i p_i pad(sqrt(s_i) A_i) per module, at the top rank."""
    averages = {}
    for module in record.adapters[0]:
        U = V = 0
        for p, adapter in zip(record.weights, record.adapters):
            f = adapter[module]
            root, missing = math.sqrt(f.scale), TOP_RANK - f.rank
            U = U + p * pad(root * f.B, (0, missing))
            V = V + p * pad(root * f.A, (0, 0, 0, missing))
        averages[module] = (U, V)
    return averages


def average_head(record: RoundRecord) -> dict[str, Tensor]:
    return {
        key: sum(p * head[key] for p, head in zip(record.weights, record.heads))
        for key in record.heads[0]
    }


def max_weight_gap(models, state: dict[str, Tensor]) -> float:
    """The largest difference between the models' effective (merged) parameters and ``state``."""
    return max(
        float((merged[key] - state[key]).abs().max())
        for merged in map(merged_state, models)
        for key in state
    )


def max_logit_gap(models, expected, batch) -> float:
    target = logits(expected, batch)
    return max(float((logits(model, batch) - target).abs().max()) for model in models)


EXACT_CASES = [
    ("fedex", "bert"),
    ("fedex", "llama"),
    ("fedex", "gpt2"),
    ("flora", "bert"),
    ("flora", "llama"),
    ("flora", "gpt2"),
]


@pytest.mark.parametrize(("rule", "family"), EXACT_CASES)
def test_exact_rules_run_the_ideal_model(rule, family):
    """Two rounds (the second on a drifted base): every client runs W_{t-1} + dW* and the
    averaged head: its merged weights to 1e-12 and its logits to 1e-10, in float64 (Llama's
    RMSNorm computes in float32, so there the weights carry the float64 precision)."""
    federation = ModelFederation(rule, family)
    batch = token_batch()
    for _ in range(2):
        record = federation.round()
        assert starts_agree(record)
        ideal = ideal_state(record)
        assert max_weight_gap(federation.clients, ideal) < 1e-12
        expected = plain_model(federation.pretrained, ideal)
        start = plain_model(federation.pretrained, record.before[0])
        assert max_logit_gap(federation.clients, expected, batch) < TOLERANCE
        assert max_logit_gap([start], expected, batch) > 1e-3


def test_fedavg_clients_load_slices_of_the_averaged_factors():
    """Client i runs pretrained + U[:, :r_i] V[:r_i] (its sqrt(s_i) divided out of both slices) and
    the averaged head; this is not the ideal model."""
    federation = ModelFederation("fedavg", "bert")
    batch = token_batch()
    for _ in range(2):
        record = federation.round()
        averages, head = folded_averages(record), average_head(record)
        for model, spec in zip(federation.clients, federation.specs):
            weights = {
                m: w + averages[m][0][:, : spec.ranks[m]] @ averages[m][1][: spec.ranks[m]]
                for m, w in pretrained_weights(model).items()
            }
            expected = plain_state_with(federation.pretrained, weights, head)
            assert (
                max_logit_gap([model], plain_model(federation.pretrained, expected), batch)
                < TOLERANCE
            )
        ideal = plain_model(federation.pretrained, ideal_state(record))
        assert max_logit_gap(federation.clients, ideal, batch) > 1e-3


def test_fedsa_clients_keep_their_own_b_and_head():
    """Client i loads its slice of the averaged A and keeps its trained B_i and head."""
    federation = ModelFederation("fedsa", "bert")
    batch = token_batch()
    for _ in range(2):
        record = federation.round()
        averages = folded_averages(record)
        for i, model in enumerate(federation.clients):
            own, loaded = record.adapters[i], read_adapter(model)
            assert all(torch.equal(loaded[m].B, own[m].B) for m in own)
            assert all(torch.equal(read_head(model)[k], t) for k, t in record.heads[i].items())
            weights = {}
            for m, w in pretrained_weights(model).items():
                f = own[m]
                A = averages[m][1][: f.rank] / math.sqrt(f.scale)
                assert torch.allclose(loaded[m].A, A, rtol=0, atol=1e-14)
                weights[m] = w + f.scale * f.B @ A
            expected = plain_state_with(federation.pretrained, weights, record.heads[i])
            assert (
                max_logit_gap([model], plain_model(federation.pretrained, expected), batch)
                < TOLERANCE
            )
