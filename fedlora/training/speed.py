"""A LoRA client's model made fast on CUDA, once per trainable copy: the frozen base stored in
bfloat16 (``base-dtype``) and torch.compile (``torch-compile``). Nothing changes on the CPU.

Under bf16 autocast a float32 weight is rounded to bfloat16 at every matmul; storing the frozen
weights in bfloat16 rounds them once instead, so an adapted layer's matmul sees the same bf16 copy
of pretrained + base shift either way. The LoRA factors and the head stay float32 (they train), and
so does the base shift (`fedlora.models.peft_io.base_shifts`): the exactness probes read the exact
shift, not the rounded base. Embeddings and norms are stored in bfloat16 too, so the residual
stream runs in bfloat16.

``blocks`` compiles each of the model's repeated layers (transformers' ``_no_split_modules``: one
compilation serves them all, seconds); ``model`` the whole forward (the fastest steps; about a
minute on the 0.4B Llama, once per worker and rank pattern). A causal LM compiled for training
returns no key-value cache from its forward (generation still asks for one).
"""

from __future__ import annotations

import torch
from torch import nn

from fedlora.config import RunConfig
from fedlora.errors import ConfigError
from fedlora.models.peft_io import pretrained_weights


def prepare_for_training(model: nn.Module, config: RunConfig, device: torch.device) -> nn.Module:
    """``model`` (a peft LoRA copy on ``device``) with the run's ``base-dtype`` and
    ``torch-compile`` applied in place where ``device`` is CUDA."""
    if device.type != "cuda":
        return model
    if config.base_dtype == "bfloat16":
        store_frozen_in_bfloat16(model)
    if config.torch_compile != "none":
        compile_in_place(model, config.torch_compile)
    return model


@torch.no_grad()
def store_frozen_in_bfloat16(model: nn.Module) -> None:
    """Every frozen floating-point parameter in bfloat16; trainable ones stay as they are. The
    pretrained base weights are captured first, in their own dtype (`pretrained_weights`)."""
    pretrained_weights(model)
    for parameter in model.parameters():
        if not parameter.requires_grad and parameter.is_floating_point():
            parameter.data = parameter.data.to(torch.bfloat16)


def compile_in_place(model: nn.Module, mode: str) -> None:
    """torch.compile the whole model (``model``) or each repeated block (``blocks``)."""
    transformer = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(transformer.config, "use_cache", None):
        transformer.config.use_cache = False
    if mode == "model":
        model.compile()
        return
    for block in repeated_blocks(transformer):
        block.compile()


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules of the classes transformers keeps whole (``_no_split_modules``: a decoder or
    encoder layer); refused for a model that names none."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    if not blocks:
        raise ConfigError(
            f"torch-compile = 'blocks': {type(model).__name__} names no repeated layer "
            "(transformers' _no_split_modules); use torch-compile = 'model'"
        )
    return blocks
