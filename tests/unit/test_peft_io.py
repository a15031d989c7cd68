"""peft_io against peft itself: ranks, scales, orientation (Conv1D), head keys and client states."""

import copy
from dataclasses import replace

import pytest
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from fedlora.lora.adapter import LoRAFactors, lora_scale
from fedlora.lora.client_state import ClientState
from fedlora.models.peft_io import (
    ModelMismatchError,
    apply_client_state,
    base_weights,
    client_state_from_model,
    lora_layers,
    pretrained_weights,
    read_adapter,
    read_head,
    write_adapter,
    write_head,
)
from tests.support.models import (
    FAMILIES,
    logits,
    perturb_trainable,
    plain_model,
    plain_state_with,
    token_batch,
    with_lora,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 1e-12


VARIANTS = [
    pytest.param(family, rslora, id=f"{family}-{'rslora' if rslora else 'lora'}")
    for family in FAMILIES
    for rslora in (False, True)
]


def trained(family: str, rank: int = 4, pattern_rank: int = 2, rslora: bool = False, seed=0):
    """The family's pretrained model and a LoRA model on it with B non-zero (as after training)."""
    pretrained = FAMILIES[family].build()
    model = with_lora(pretrained, FAMILIES[family], rank, rslora=rslora, pattern_rank=pattern_rank)
    perturb_trainable(model, torch.Generator().manual_seed(seed))
    return pretrained, model


def random_like(adapter, generator):
    def noise(t):
        return torch.randn(t.shape, generator=generator, dtype=t.dtype)

    return {m: replace(f, A=noise(f.A), B=noise(f.B)) for m, f in adapter.items()}


def close(x, y, tolerance=TOLERANCE) -> bool:
    return x.shape == y.shape and float((x - y).detach().abs().max()) <= tolerance


@pytest.mark.parametrize(("family", "rslora"), VARIANTS)
def test_read_adapter_has_peft_ranks_scales_and_delta(family, rslora):
    _, model = trained(family, rank=4, pattern_rank=2, rslora=rslora)
    adapter = read_adapter(model)
    layers = lora_layers(model)
    assert set(adapter) == {
        key.removesuffix(".lora_A.weight")
        for key in get_peft_model_state_dict(model)
        if key.endswith(".lora_A.weight")
    }
    for module, factors in adapter.items():
        rank = 2 if module.endswith(FAMILIES[family].pattern_module) else 4
        assert factors.rank == rank
        assert factors.scale == pytest.approx(lora_scale(8.0, rank, rslora), rel=1e-15)
        peft_delta = layers[module].get_delta_weight("default")
        linear_delta = peft_delta.T if layers[module].fan_in_fan_out else peft_delta
        assert close(factors.delta(), linear_delta)
    assert any(m.endswith(FAMILIES[family].pattern_module) for m in adapter)


@pytest.mark.parametrize("family", FAMILIES)
def test_effective_weight_reproduces_each_layer(family):
    """base + s B A in Linear orientation is what every adapted layer computes: x W^T + bias."""
    _, model = trained(family)
    adapter, bases, layers = read_adapter(model), base_weights(model), lora_layers(model)
    x = torch.randn(5, 3, 200, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for module, layer in layers.items():
        weight = bases[module] + adapter[module].delta()
        inputs = x[..., : weight.shape[1]]
        with torch.no_grad():
            expected = torch.nn.functional.linear(inputs, weight, layer.get_base_layer().bias)
            assert close(layer(inputs), expected)


def test_gpt2_conv1d_non_square_orientation():
    """c_attn maps 32 -> 96: Conv1D stores its weight as (32 x 96); the core sees (96 x 32)."""
    _, model = trained("gpt2")
    module = "base_model.model.transformer.h.1.attn.c_attn"
    layer = lora_layers(model)[module]
    assert tuple(layer.get_base_layer().weight.shape) == (32, 96)
    assert read_adapter(model)[module].shape == (96, 32)
    assert torch.equal(base_weights(model)[module], layer.get_base_layer().weight.T)


@pytest.mark.parametrize(("family", "rslora"), VARIANTS)
def test_write_adapter_round_trips(family, rslora):
    _, model = trained(family, rslora=rslora)
    adapter = random_like(read_adapter(model), torch.Generator().manual_seed(2))
    write_adapter(model, adapter)
    read = read_adapter(model)
    peft_state = get_peft_model_state_dict(model)
    for module, factors in adapter.items():
        assert torch.equal(read[module].A, factors.A) and torch.equal(read[module].B, factors.B)
        assert read[module].scale == factors.scale
        assert torch.equal(peft_state[module + ".lora_A.weight"], factors.A)
        assert torch.equal(peft_state[module + ".lora_B.weight"], factors.B)


def test_head_keys_are_peft_state_dict_keys_and_round_trip():
    pretrained, model = trained("bert")
    head = read_head(model)
    assert set(head) == {
        "base_model.model.classifier.weight",
        "base_model.model.classifier.bias",
    }
    peft_state = get_peft_model_state_dict(model)
    assert all(torch.equal(peft_state[key], tensor) for key, tensor in head.items())
    generator = torch.Generator().manual_seed(3)
    new_head = {
        k: torch.randn(t.shape, generator=generator, dtype=t.dtype) for k, t in head.items()
    }
    write_head(model, new_head)
    assert all(torch.equal(read_head(model)[k], t) for k, t in new_head.items())
    other = with_lora(pretrained, FAMILIES["bert"], 4, pattern_rank=2)
    set_peft_model_state_dict(other, get_peft_model_state_dict(model))
    assert all(torch.equal(read_head(other)[k], t) for k, t in new_head.items())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_no_modules_to_save_means_empty_head(family):
    _, model = trained(family)
    assert read_head(model) == {}


def random_state(model, seed: int, shifted_modules: int = 3) -> ClientState:
    """A client state fitting the model: random adapter and head, base shifts on a few modules."""
    generator = torch.Generator().manual_seed(seed)
    adapter = random_like(read_adapter(model), generator)
    head = {
        k: torch.randn(t.shape, generator=generator, dtype=t.dtype)
        for k, t in read_head(model).items()
    }
    base_shift = {
        m: 0.05 * torch.randn(f.shape, generator=generator, dtype=torch.float64)
        for m, f in list(adapter.items())[-shifted_modules:]
    }
    return ClientState(adapter=adapter, head=head, base_shift=base_shift)


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_client_state_round_trips_and_runs_its_weights(family):
    pretrained, model = trained(family)
    original = base_weights(model)
    state = random_state(model, seed=4)
    apply_client_state(model, state)
    read = client_state_from_model(model)
    assert set(read.base_shift) == set(state.base_shift)
    for module, shift in state.base_shift.items():
        assert close(read.base_shift[module], shift)
    for module, factors in state.adapter.items():
        assert torch.equal(read.adapter[module].A, factors.A)
        assert torch.equal(read.adapter[module].B, factors.B)
    assert all(torch.equal(read.head[k], t) for k, t in state.head.items())
    assert all(torch.equal(pretrained_weights(model)[m], w) for m, w in original.items())

    weights = {m: original[m] + state.effective_delta(m) for m in state.adapter}
    expected = plain_model(pretrained, plain_state_with(pretrained, weights, state.head))
    batch = token_batch()
    assert close(logits(model, batch), logits(expected, batch), 1e-10)


def test_apply_resets_unshifted_modules_to_pretrained():
    _, model = trained("gpt2")
    original = base_weights(model)
    apply_client_state(model, random_state(model, seed=5))
    apply_client_state(model, replace(random_state(model, seed=6), base_shift={}))
    assert all(torch.equal(base_weights(model)[m], w) for m, w in original.items())
    assert client_state_from_model(model).base_shift == {}


def test_pretrained_copy_travels_with_copies_and_can_be_passed():
    pretrained, model = trained("llama")
    captured = pretrained_weights(model)
    state = random_state(model, seed=7)
    apply_client_state(model, state)
    clone = copy.deepcopy(model)
    assert all(torch.equal(pretrained_weights(clone)[m], w) for m, w in captured.items())
    other = with_lora(pretrained, FAMILIES["llama"], 4, pattern_rank=2)
    apply_client_state(other, state, pretrained=captured)
    read = client_state_from_model(other, pretrained=captured)
    assert all(close(read.base_shift[m], shift) for m, shift in state.base_shift.items())


# ---- errors name the module -----------------------------------------------------------------------

QUERY = "base_model.model.bert.encoder.layer.1.attention.self.query"


def test_write_adapter_refuses_a_missing_module():
    _, model = trained("bert")
    adapter = read_adapter(model)
    del adapter[QUERY]
    with pytest.raises(ModelMismatchError, match="missing.*layer.1.attention.self.query"):
        write_adapter(model, adapter)


def test_write_adapter_refuses_an_unknown_module():
    _, model = trained("bert")
    adapter = read_adapter(model)
    adapter["base_model.model.bert.encoder.layer.7.attention.self.query"] = adapter[QUERY]
    with pytest.raises(ModelMismatchError, match="has no.*layer.7"):
        write_adapter(model, adapter)


def test_write_adapter_refuses_a_rank_mismatch():
    _, model = trained("bert")
    adapter = read_adapter(model)
    f = adapter[QUERY]
    adapter[QUERY] = LoRAFactors(A=f.A[:3], B=f.B[:, :3], scale=f.scale)
    with pytest.raises(ModelMismatchError, match=f"{QUERY}.*rank 3.*rank 4"):
        write_adapter(model, adapter)


def test_write_adapter_refuses_a_shape_mismatch():
    _, model = trained("gpt2")
    adapter = read_adapter(model)
    module = "base_model.model.transformer.h.0.mlp.c_fc"
    f = adapter[module]
    adapter[module] = LoRAFactors(A=f.B.T, B=f.A.T, scale=f.scale)  # transposed: (32, 128)
    with pytest.raises(ModelMismatchError, match=f"{module}.*\\(32, 128\\).*\\(128, 32\\)"):
        write_adapter(model, adapter)


def test_write_adapter_refuses_a_scale_mismatch():
    _, model = trained("bert")
    adapter = read_adapter(model)
    adapter[QUERY] = replace(adapter[QUERY], scale=adapter[QUERY].scale * 2)
    with pytest.raises(ModelMismatchError, match=f"{QUERY}.*scale"):
        write_adapter(model, adapter)


def test_write_head_refuses_unknown_and_misshapen_parameters():
    _, model = trained("bert")
    head = read_head(model)
    with pytest.raises(ModelMismatchError, match="has no.*pooler"):
        write_head(
            model,
            {**head, "base_model.model.pooler.weight": head["base_model.model.classifier.bias"]},
        )
    head["base_model.model.classifier.bias"] = torch.zeros(5, dtype=torch.float64)
    with pytest.raises(ModelMismatchError, match="classifier.bias.*\\(5,\\)"):
        write_head(model, head)


def test_apply_refuses_a_misshapen_or_unknown_base_shift():
    _, model = trained("llama")
    module = "base_model.model.model.layers.0.self_attn.k_proj"
    untouched = read_adapter(model)
    state = random_state(model, seed=8)
    state.base_shift[module] = torch.zeros(32, 32, dtype=torch.float64)
    with pytest.raises(ModelMismatchError, match=f"{module}.*\\(32, 32\\).*\\(16, 32\\)"):
        apply_client_state(model, state)
    assert all(torch.equal(read_adapter(model)[m].B, f.B) for m, f in untouched.items())
    state.base_shift = {"base_model.model.lm_head": torch.zeros(100, 32, dtype=torch.float64)}
    with pytest.raises(ModelMismatchError, match="lm_head"):
        apply_client_state(model, state)


def test_merged_adapters_are_refused():
    _, model = trained("bert")
    model.merge_adapter()
    with pytest.raises(ModelMismatchError, match="merged"):
        read_adapter(model)


def test_dora_is_refused():
    pretrained = FAMILIES["llama"].build()
    model = with_lora(pretrained, replace(FAMILIES["llama"], lora_options={"use_dora": True}), 2)
    with pytest.raises(ModelMismatchError, match="DoRA"):
        read_adapter(model)


def test_trained_base_biases_are_refused():
    pretrained = FAMILIES["bert"].build()
    model = with_lora(pretrained, replace(FAMILIES["bert"], lora_options={"bias": "all"}), 2)
    with pytest.raises(ModelMismatchError, match="bias='all'"):
        read_adapter(model)


def test_layers_and_head_are_found_once_per_model_and_copies_find_their_own():
    _, model = trained("bert")
    walks, walk = [], model.named_modules
    model.named_modules = lambda *args, **kwargs: walks.append(1) or walk(*args, **kwargs)
    layers, head = lora_layers(model), read_head(model)
    layers.clear()  # the caller's dict, not the remembered one
    again = lora_layers(model)
    read_head(model)
    assert len(walks) == 2  # once for the layers, once for the head
    del model.named_modules
    assert again and all(again[name] is module for name, module in lora_layers(model).items())
    copied = copy.deepcopy(model)
    copied_layers = lora_layers(copied)
    assert copied_layers.keys() == again.keys()
    assert all(copied_layers[name] is not again[name] for name in again)
    write_head(copied, {key: torch.zeros_like(t) for key, t in head.items()})
    assert all(torch.equal(read_head(model)[key], t) for key, t in head.items())
    model.merge_adapter()  # a layer's state is checked on every call
    with pytest.raises(ModelMismatchError, match="merged"):
        lora_layers(model)
