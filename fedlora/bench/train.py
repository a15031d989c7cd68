"""Training throughput in one process: the plain peft LoRA loop at a batch, and a group of clients
trained together (`fedlora.training.grouped`).

Both draw their batches from the run's client partitions before the clock starts, run
``warmup`` untimed steps, then ``steps`` timed ones; a token is a position of a batch (rows x
width, padding included, as a GPU computes it). MFU counts 4 x parameters x tokens/s (forward 2,
backward through the frozen base 2: no weight gradients) against the device's dense bf16 peak.

``bf16_weights`` keeps the base's weights in bfloat16 on the device (no float32 copy cast at every
matmul), the LoRA factors in float32, and takes the fused AdamW; otherwise the weights stay
float32 under bf16 autocast as a client trains today.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from fedlora.config import RunConfig
from fedlora.data.encoding import batches
from fedlora.data.partitioning import client_data
from fedlora.errors import ConfigError
from fedlora.models.base_model import BaseModel, with_lora
from fedlora.models.grouped_lora import fresh_group
from fedlora.training.grouped import train_group
from fedlora.training.local import client_seed, train_local

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}
"""Dense bf16 peak of the GPUs the figures are quoted for, by a word of the device's name."""


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def mfu(parameters: int, tokens_per_s: float, name: str) -> float | None:
    """Model FLOP utilisation, 4 x parameters x tokens/s over the peak of the device called
    ``name``; None for devices without a known peak."""
    peak = next((flops for word, flops in PEAK_BF16_FLOPS.items() if word in name), None)
    return None if peak is None else 4 * parameters * tokens_per_s / peak


def base_on(base: BaseModel, device: torch.device, bf16_weights: bool) -> nn.Module:
    """A copy of the frozen base on ``device``, in bfloat16 if asked."""
    model = copy.deepcopy(base.model).to(device)
    return model.to(torch.bfloat16) if bf16_weights else model


def make_adamw(parameters, config: RunConfig, fused: bool) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        parameters, lr=config.learning_rate, weight_decay=config.weight_decay, fused=fused or None
    )


def tokens_of(drawn: Sequence[dict]) -> int:
    return sum(batch["input_ids"].numel() for batch in drawn)


def plain_throughput(
    base: BaseModel,
    config: RunConfig,
    device: torch.device,
    batch_size: int,
    num_partitions: int,
    steps: int,
    warmup: int,
    bf16_weights: bool = False,
) -> dict:
    """Tokens/s of one peft LoRA model (the run's top rank) at ``batch_size`` rows a step, on
    partition 0's training examples."""
    model = with_lora(
        base,
        config.max_rank,
        config.lora_alpha,
        config.rslora,
        config.target_module_names,
        config.head_module_names,
        device=device,
        seed=config.seed,
    )
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if bf16_weights:
        model.to(torch.bfloat16)
        for parameter in trainable:
            parameter.data = parameter.data.float()
    optimizer = make_adamw(trainable, config, fused=bf16_weights)
    data = client_data(config, 0, num_partitions).train
    seed = client_seed(config.seed, 0, 1)
    drawn = list(
        batches(
            data, base.tokenizer, config.max_length, batch_size, seed, warmup + steps, config.task
        )
    )
    if warmup:
        train_local(
            model,
            drawn[:warmup],
            warmup,
            config.learning_rate,
            config.weight_decay,
            device,
            optimizer=optimizer,
            seed=seed,
        )
    report = train_local(
        model,
        drawn[warmup:],
        steps,
        config.learning_rate,
        config.weight_decay,
        device,
        optimizer=optimizer,
        seed=seed,
    )
    return rate(tokens_of(drawn[warmup:]), report.seconds, batch_size, base, device)


def grouped_throughput(
    base: BaseModel,
    config: RunConfig,
    device: torch.device,
    group_size: int,
    num_partitions: int,
    steps: int,
    warmup: int,
    bf16_weights: bool = False,
) -> dict:
    """Tokens/s of partitions 0..group_size-1 (their ranks, data and seeds) trained as one group
    at ``batch-size`` rows each."""
    if group_size > num_partitions:
        raise ConfigError(f"a group of {group_size} clients, but the run has {num_partitions}")
    clients = range(group_size)
    ranks = [config.rank_for(client, num_partitions) for client in clients]
    group = fresh_group(
        base_on(base, device, bf16_weights),
        ranks,
        config.lora_alpha,
        config.rslora,
        config.target_module_names,
        config.seed,
        config.head_module_names,
    )
    drawn = []
    for client in clients:
        data = client_data(config, client, num_partitions).train
        seed = client_seed(config.seed, client, 1)
        drawn.append(
            list(
                batches(
                    data,
                    base.tokenizer,
                    config.max_length,
                    config.batch_size,
                    seed,
                    warmup + steps,
                    config.task,
                )
            )
        )
    fused = bf16_weights
    if warmup:
        train_group(
            group,
            [client[:warmup] for client in drawn],
            warmup,
            config.learning_rate,
            config.weight_decay,
            device,
            seed=config.seed,
            fused=fused,
        )
    reports = train_group(
        group,
        [client[warmup:] for client in drawn],
        steps,
        config.learning_rate,
        config.weight_decay,
        device,
        seed=config.seed,
        fused=fused,
    )
    tokens = sum(tokens_of(client[warmup:]) for client in drawn)
    result = rate(tokens, reports[0].seconds, group_size * config.batch_size, base, device)
    return {**result, "clients": group_size, "ranks": ranks}


def rate(tokens: int, seconds: float, rows: int, base: BaseModel, device: torch.device) -> dict:
    tokens_per_s = tokens / seconds
    parameters = sum(parameter.numel() for parameter in base.model.parameters())
    return {
        "tokens": tokens,
        "seconds": seconds,
        "rows_per_step": rows,
        "tokens_per_s": tokens_per_s,
        "mfu": mfu(parameters, tokens_per_s, device_name(device)),
    }
