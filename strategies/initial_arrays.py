"""The initial global arrays a ServerApp starts a method from, built as the clients build theirs:
the base model's adapter at the top rank and its seeded head."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

from fedlora.config import RunConfig
from fedlora.models.base_model import (
    load_base_model,
    sb_head_parameters,
    with_lora,
    with_sb_layers,
)
from fedlora.models.peft_io import read_adapter, read_head
from fedlora.models.sb_layer import sb_layers
from fedlora.wire.messages import SB_A_SUFFIX, SB_B_SUFFIX, adapter_to_tensors


def lora_initial_arrays(config: RunConfig) -> ArrayRecord:
    """peft's ``lora_A``/``lora_B`` at the top rank (A seeded, B = 0) and the head."""
    model = with_lora(
        load_base_model(config),
        config.max_rank,
        config.lora_alpha,
        config.rslora,
        config.target_module_names,
        config.head_module_names,
        seed=config.seed,
    )
    return ArrayRecord({**adapter_to_tensors(read_adapter(model)), **read_head(model)})


def sb_initial_arrays(config: RunConfig) -> ArrayRecord:
    """Zero ``sb_A``/``sb_B`` placeholders at the top rank and the head: the strategy then runs
    the federated LoRA-SB start (`strategies.fedsb`)."""
    model = with_sb_layers(
        load_base_model(config),
        config.max_rank,
        config.max_rank,
        config.target_module_names,
        modules_to_save=config.head_module_names,
    )
    placeholders = {}
    for module, layer in sb_layers(model).items():
        d_out, d_in = layer.sb_B.out_features, layer.sb_A.in_features
        placeholders[module + SB_A_SUFFIX] = torch.zeros(config.max_rank, d_in)
        placeholders[module + SB_B_SUFFIX] = torch.zeros(d_out, config.max_rank)
    head = {key: p.detach() for key, p in sb_head_parameters(model).items()}
    return ArrayRecord({**placeholders, **head})
