"""``base-dtype`` and ``torch-compile`` (`fedlora.training.speed`): the frozen base in bfloat16 keeps
the base shift exact, nothing changes on the CPU, and the refusals; on CUDA, a compiled bf16 client
trains as the float32 one does."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from fedlora.config import RunConfig
from fedlora.errors import ConfigError
from fedlora.lora import probes
from fedlora.lora.client_state import ClientState
from fedlora.lora.probes import lora_probe_responses, probe_vectors
from fedlora.models import peft_io
from fedlora.models.base_model import load_base_model, with_lora
from fedlora.models.generation import greedy_replies
from fedlora.models.peft_io import (
    apply_client_state,
    base_weights,
    client_state_from_model,
    pretrained_weights,
    read_adapter,
)
from fedlora.training.local import train_local
from fedlora.training.speed import prepare_for_training, repeated_blocks, store_frozen_in_bfloat16

CONFIG = RunConfig.from_flower(
    {"model": "tiny-llama", "task": "causal-lm", "target-modules": "q_proj,v_proj"}
)
FAST = RunConfig.from_flower(
    {
        "model": "tiny-llama",
        "task": "causal-lm",
        "target-modules": "q_proj,v_proj",
        "base-dtype": "bfloat16",
        "torch-compile": "blocks",
    }
)


def lora_copy(config: RunConfig, device="cpu") -> nn.Module:
    base = load_base_model(config)
    return with_lora(base, 4, 8.0, False, ("q_proj", "v_proj"), (), device=device, seed=3)


def shifted_state(model: nn.Module) -> ClientState:
    """The model's state with a random float32 base shift and B on every module."""
    generator = torch.Generator().manual_seed(0)
    state = client_state_from_model(model)
    adapter = {
        module: type(factors)(
            A=factors.A,
            B=torch.randn(factors.B.shape, generator=generator).to(factors.B.device),
            scale=factors.scale,
        )
        for module, factors in state.adapter.items()
    }
    shift = {
        module: 1e-3 * torch.randn(weight.shape, generator=generator).to(weight.device)
        for module, weight in base_weights(model).items()
    }
    return ClientState(adapter=adapter, head=state.head, base_shift=shift)


def test_the_cpu_keeps_float32_and_no_compilation():
    model = lora_copy(FAST)
    forward = model.forward
    prepare_for_training(model, FAST, torch.device("cpu"))
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}
    assert model.forward == forward


def test_a_bfloat16_base_keeps_the_shift_exact():
    model = lora_copy(CONFIG)
    pretrained = {module: weight.clone() for module, weight in pretrained_weights(model).items()}
    store_frozen_in_bfloat16(model)
    dtypes = {name: parameter.dtype for name, parameter in model.named_parameters()}
    assert all(dtypes[name] == torch.float32 for name in dtypes if "lora_" in name)
    assert all(dtypes[name] == torch.bfloat16 for name in dtypes if "lora_" not in name)
    assert all(torch.equal(pretrained[m], w) for m, w in pretrained_weights(model).items())
    state = shifted_state(model)
    apply_client_state(model, state)
    for module, weight in base_weights(model).items():  # the base holds the rounded sum
        assert torch.equal(weight, (pretrained[module] + state.base_shift[module]).bfloat16())
    read_back = client_state_from_model(model).base_shift
    assert all(torch.equal(read_back[m], shift) for m, shift in state.base_shift.items())
    responses = lora_probe_responses(model, seed=5)
    for module, factors in read_adapter(model).items():
        expected = state.base_shift[module].double() + factors.scale * (
            factors.B.double() @ factors.A.double()
        )
        X = probe_vectors(5, module, expected.shape[1])
        assert torch.allclose(responses[module], expected @ X, rtol=0, atol=1e-10)


def test_the_probes_read_a_bfloat16_base_once(monkeypatch):
    model = lora_copy(CONFIG)
    pretrained_weights(model)
    store_frozen_in_bfloat16(model)
    apply_client_state(model, shifted_state(model))
    reads = []

    def counted(*args, **kwargs):
        reads.append(args)
        return base_weights(*args, **kwargs)

    monkeypatch.setattr(peft_io, "base_weights", counted)
    monkeypatch.setattr(probes, "base_weights", counted)
    lora_probe_responses(model, seed=5)
    assert len(reads) == 1


def test_blocks_are_the_decoder_layers_and_a_model_without_them_is_refused():
    model = lora_copy(CONFIG)
    blocks = repeated_blocks(model.get_base_model())
    layers = model.get_base_model().config.num_hidden_layers
    assert len(blocks) == layers and {type(b).__name__ for b in blocks} == {"LlamaDecoderLayer"}
    with pytest.raises(ConfigError, match="torch-compile = 'model'"):
        repeated_blocks(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("key, value", [("base-dtype", "bfloat16"), ("torch-compile", "model")])
def test_fast_training_is_refused_under_dp_sgd(key, value):
    with pytest.raises(ConfigError, match=f"{key} = '{value}' is not supported with dp-sample"):
        RunConfig.from_flower({key: value, "dp-sample": True})


@pytest.mark.parametrize("key", ["base-dtype", "torch-compile"])
def test_an_unknown_choice_is_refused(key):
    with pytest.raises(ConfigError, match=f"{key} = 'float16': choose one of"):
        RunConfig.from_flower({key: "float16"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["blocks", "model"])
def test_a_compiled_bfloat16_client_trains_as_the_float32_one(mode):
    cuda = torch.device("cuda")
    fast = replace(FAST, torch_compile=mode)
    torch.manual_seed(0)
    batches = [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        for ids in torch.randint(3, 60, (3, 4, 24))
    ]
    trained = []
    for config in (CONFIG, fast):
        model = lora_copy(config, device=cuda)
        apply_client_state(model, shifted_state(model))
        prepare_for_training(model, config, cuda)
        report = train_local(model, batches, 3, 1e-3, 0.0, cuda, seed=1)
        trained.append((report.loss, read_adapter(model)))
        tokenizer = load_base_model(config).tokenizer
        assert len(greedy_replies(model, tokenizer, [[5, 6, 7]], 4, 1)) == 1
    (loss, adapter), (fast_loss, fast_adapter) = trained
    assert fast_loss == pytest.approx(loss, rel=2e-2)
    for module, factors in adapter.items():
        difference = (fast_adapter[module].B - factors.B).norm() / factors.B.norm()
        assert difference < 5e-2
