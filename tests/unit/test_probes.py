"""The exactness probes: what a client measures on its live model, against peft's own merge."""

from __future__ import annotations

import pytest
import torch

from fedlora.lora.client_state import ClientState
from fedlora.lora.lowrank import LowRank
from fedlora.lora.probes import (
    PROBE_COUNT,
    lora_probe_responses,
    probe_responses,
    probe_vectors,
    probe_vectors_on,
    relative_deviation,
    sb_weight_changes,
)
from fedlora.models.peft_io import apply_client_state, client_state_from_model, pretrained_weights
from fedlora.models.sb_layer import inject_sb_layers
from tests.support.models import FAMILIES, PEFT_PREFIX, merged_state, perturb_trainable, with_lora


def test_probe_vectors_are_seeded_by_run_and_module():
    X = probe_vectors(3, "a.query", 5)
    assert X.shape == (5, PROBE_COUNT) and X.dtype == torch.float64
    assert torch.equal(X, probe_vectors(3, "a.query", 5))
    assert not torch.equal(X, probe_vectors(3, "a.value", 5))
    assert not torch.equal(X, probe_vectors(4, "a.query", 5))


def test_probe_vectors_on_a_device_are_made_once_per_seed_module_and_device():
    cpu = torch.device("cpu")
    X = probe_vectors_on(3, "a.query", 5, cpu)
    assert torch.equal(X, probe_vectors(3, "a.query", 5))
    assert probe_vectors_on(3, "a.query", 5, cpu) is X
    assert probe_vectors_on(4, "a.query", 5, cpu) is not X


def test_factored_and_dense_changes_give_the_same_responses():
    generator = torch.Generator().manual_seed(0)
    U = torch.randn(6, 2, generator=generator, dtype=torch.float64)
    V = torch.randn(2, 5, generator=generator, dtype=torch.float64)
    factored = probe_responses({"m": LowRank(U, V)}, seed=1)["m"]
    dense = probe_responses({"m": U @ V}, seed=1)["m"]
    assert torch.allclose(factored, dense, atol=1e-14)
    assert torch.allclose(dense, U @ V @ probe_vectors(1, "m", 5), atol=1e-14)


def test_relative_deviation_is_the_worst_module_and_zero_below_the_floor():
    expected = {
        "a": torch.ones(3, 2, dtype=torch.float64),
        "b": torch.zeros(3, 2, dtype=torch.float64),
    }
    measured = {"a": expected["a"] * 1.1, "b": torch.zeros(3, 2, dtype=torch.float64)}
    assert relative_deviation(measured, expected) == pytest.approx(0.1)
    measured["b"] = torch.full((3, 2), 1e-3, dtype=torch.float64)
    assert relative_deviation(measured, expected) > 1e6
    with pytest.raises(ValueError, match="missing"):
        relative_deviation({"a": expected["a"]}, expected)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_lora_probe_responses_match_peft_merge(family):
    """(base shift + s B A) X per module equals peft's merged weight minus the pretrained one,
    times X (GPT-2's Conv1D turned to Linear orientation)."""
    pretrained = FAMILIES[family].build()
    model = with_lora(pretrained, FAMILIES[family], rank=4, pattern_rank=2)
    generator = torch.Generator().manual_seed(1)
    perturb_trainable(model, generator)
    local = client_state_from_model(model)
    shift = {
        module: 0.01 * torch.randn(weight.shape, generator=generator, dtype=weight.dtype)
        for module, weight in pretrained_weights(model).items()
    }
    apply_client_state(model, ClientState(adapter=local.adapter, head=local.head, base_shift=shift))
    merged, original = merged_state(model), pretrained.state_dict()
    responses = lora_probe_responses(model, seed=3)
    assert set(responses) == set(shift)
    for module, response in responses.items():
        key = module.removeprefix(PEFT_PREFIX) + ".weight"
        expected = merged[key] - original[key]
        if FAMILIES[family].lora_options.get("fan_in_fan_out"):
            expected = expected.T
        X = probe_vectors(3, module, expected.shape[1])
        assert torch.allclose(response, expected.double() @ X, atol=1e-10)


def test_sb_weight_changes_are_b_r_a_of_each_layer():
    model = FAMILIES["bert"].build()
    generator = torch.Generator().manual_seed(2)
    targets = {"bert.encoder.layer.0.attention.self.query": (32, 32)}
    fixed = {
        m: LowRank(
            torch.randn(d_out, 3, generator=generator, dtype=torch.float64),
            torch.randn(3, d_in, generator=generator, dtype=torch.float64),
        )
        for m, (d_out, d_in) in targets.items()
    }
    cores = {m: torch.randn(3, 3, generator=generator, dtype=torch.float64) for m in targets}
    inject_sb_layers(model, list(targets), fixed, cores, capacity=2)
    for module, change in sb_weight_changes(model).items():
        assert torch.allclose(
            change.dense(), fixed[module].U @ cores[module] @ fixed[module].V, atol=1e-12
        )
