"""FedEx-LoRA's and FLoRA's deviation is measured on the weights each rank class reconstructs
from its payload, not taken as 0 because the global update is the ideal one by construction."""

import pytest
import torch

from fedlora.rules.fedex import FedExLoRA
from fedlora.rules.flora import FLoRA
from fedlora.rules.reconstruction import rank_classes
from tests.support.rounds import Federation

SHAPES = {"q": (12, 10), "v": (10, 14)}
RANKS, COUNTS = [2, 4, 4, 8], [30, 10, 20, 40]


def federation(rule, dtype, rounds=2) -> Federation:
    built = Federation(rule, SHAPES, RANKS, COUNTS, alpha=8.0, dtype=dtype, seed=3)
    for _ in range(rounds):
        built.round(list(range(len(RANKS))))
    return built


class FedExLosingTheBaseChange(FedExLoRA):
    """A broken payload: the base change of the rounds the client missed never travels."""

    def client_payload(self, state, spec):
        payload = super().client_payload(state, spec)
        payload.base_change = {}
        return payload


class FLoRABendingTheStack(FLoRA):
    """A broken payload: the stack's U travels 1% too large."""

    def client_payload(self, state, spec):
        payload = super().client_payload(state, spec)
        payload.base_change = {
            k: t * 1.01 if k.endswith((".U", ".dense")) else t
            for k, t in payload.base_change.items()
        }
        return payload


@pytest.mark.parametrize("rule", [FedExLoRA, FLoRA])
def test_float32_rounding_is_measured_small_but_not_zero(rule):
    deviation = federation(rule(), torch.float32).result.relative_deviation()
    assert 0 < deviation < 1e-5


@pytest.mark.parametrize("rule", [FedExLoRA, FLoRA])
def test_float64_is_exact_to_round_off(rule):
    assert federation(rule(), torch.float64).result.relative_deviation() < 1e-12


@pytest.mark.parametrize(
    ("rule", "least"), [(FedExLosingTheBaseChange, 0.1), (FLoRABendingTheStack, 5e-3)]
)
def test_a_broken_payload_is_detected(rule, least):
    assert federation(rule(), torch.float64).result.relative_deviation() > least


def test_one_client_of_each_rank_class_is_reconstructed():
    built = federation(FedExLoRA(), torch.float64, rounds=1)
    updates = [built.train(i) for i in range(len(RANKS))]
    assert [spec.ranks["q"] for spec in rank_classes(updates)] == [2, 4, 8]
    assert len(built.result.reconstructed["q"]) == 3
