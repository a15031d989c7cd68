"""Tiny transformer models built from configs (nothing downloaded), in float64, and their helpers.

`tiny_bert`, `tiny_llama` and `tiny_gpt2` are seeded and in eval mode (no dropout); run them
under ``torch_threads(1)``. `FAMILIES` names,
per model family, the LoRA target modules, one module for a ``rank_pattern`` and the head to train.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from fedlora.models.base_model import MINILM_PACKAGE

VOCAB = 100
PEFT_PREFIX = "base_model.model."
NEEDS_MINILM = pytest.mark.skipif(
    importlib.util.find_spec(MINILM_PACKAGE) is None, reason="the MiniLM package is absent"
)
"""For the GPU tests, run where the MiniLM package may not be installed."""


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run with ``count`` intra-op threads: tiny models only lose from threads on shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().double().eval()


def tiny_bert(seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return _seeded(lambda: BertForSequenceClassification(config), seed)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=40,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return _seeded(lambda: LlamaForCausalLM(config), seed)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _seeded(lambda: GPT2LMHeadModel(config), seed)


@dataclass(frozen=True)
class Family:
    """A model family: its factory, LoRA targets, a module to give another rank, and its head."""

    build: Callable[[], nn.Module]
    targets: tuple[str, ...]
    pattern_module: str
    modules_to_save: tuple[str, ...] = ()
    lora_options: Mapping[str, object] = field(default_factory=dict)


FAMILIES = {
    "bert": Family(
        tiny_bert,
        ("query", "key", "value", "dense"),
        "layer.0.attention.self.query",
        modules_to_save=("classifier",),
    ),
    "llama": Family(
        tiny_llama,
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        "layers.0.self_attn.k_proj",
    ),
    "gpt2": Family(
        tiny_gpt2,
        ("c_attn", "c_proj", "c_fc"),
        "h.0.attn.c_attn",
        lora_options={"fan_in_fan_out": True},
    ),
}


def with_lora(
    pretrained: nn.Module,
    family: Family,
    rank: int,
    alpha: float = 8.0,
    rslora: bool = False,
    pattern_rank: int | None = None,
) -> PeftModel:
    """LoRA on a copy of ``pretrained``; ``pattern_rank`` is the family's pattern module's rank."""
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        use_rslora=rslora,
        lora_dropout=0.0,
        target_modules=list(family.targets),
        modules_to_save=list(family.modules_to_save) or None,
        rank_pattern={family.pattern_module: pattern_rank} if pattern_rank else {},
        **family.lora_options,
    )
    return get_peft_model(copy.deepcopy(pretrained), config).eval()


def token_batch(seed: int = 0, batch: int = 3, length: int = 7) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -2:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def logits(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    with torch.no_grad():
        return model(**batch).logits


def perturb_trainable(model: nn.Module, generator: torch.Generator, size: float = 0.1) -> None:
    """Move every trainable parameter (LoRA A and B, the head) at random, as training would."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
                parameter.add_(size * noise.to(parameter.dtype))


def merged_state(model: PeftModel) -> dict[str, Tensor]:
    """The plain model's state dict that a peft model runs with (peft's own merge, on a copy)."""
    return copy.deepcopy(model).merge_and_unload().state_dict()


def plain_model(pretrained: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """A copy of the plain ``pretrained`` model loaded with ``state``."""
    model = copy.deepcopy(pretrained)
    model.load_state_dict(state)
    return model


def plain_state_with(
    pretrained: nn.Module, weights: Mapping[str, Tensor], head: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """The pretrained state dict with Linear-oriented ``weights`` per peft module path (Conv1D
    weights transposed here) and the head, keyed as in peft's adapter state dict."""
    state = {key: tensor.clone() for key, tensor in pretrained.state_dict().items()}
    for name, weight in weights.items():
        path = name.removeprefix(PEFT_PREFIX)
        is_conv1d = isinstance(pretrained.get_submodule(path), Conv1D)
        state[path + ".weight"] = weight.T if is_conv1d else weight
    for key, tensor in head.items():
        state[key.removeprefix(PEFT_PREFIX)] = tensor
    return state
