"""Training throughput in one process: the plain peft LoRA loop at a batch, and a group of clients
trained together (`fedlora.training.grouped`).

Both draw their batches from the run's client partitions before the clock starts, run
``warmup`` untimed steps, then ``steps`` timed ones; a token is a position of a batch (rows x
width, padding included, as a GPU computes it). MFU counts 4 x parameters x tokens/s (forward 2,
backward through the frozen base 2: no weight gradients) against the device's dense bf16 peak.

Both train as the run's clients do: the plain loop's model is prepared by
`fedlora.training.speed` (``base-dtype``, ``torch-compile``), the group's base is stored in
bfloat16 where ``base-dtype`` asks; on CUDA under bf16 autocast with the fused AdamW.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedlora.config import RunConfig
from fedlora.data.encoding import batches
from fedlora.data.partitioning import client_data
from fedlora.errors import ConfigError
from fedlora.models.base_model import BaseModel, copy_to, with_lora
from fedlora.models.grouped_lora import fresh_group
from fedlora.training.grouped import train_group
from fedlora.training.local import client_seed, cpu_autocast, make_optimizer, train_local
from fedlora.training.speed import prepare_for_training

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}
"""Dense bf16 peak of the GPUs the figures are quoted for, by a word of the device's name."""


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def mfu(parameters: int, tokens_per_s: float, name: str) -> float | None:
    """Model FLOP utilisation, 4 x parameters x tokens/s over the peak of the device called
    ``name``; None for devices without a known peak."""
    peak = next((flops for word, flops in PEAK_BF16_FLOPS.items() if word in name), None)
    return None if peak is None else 4 * parameters * tokens_per_s / peak


def base_on(base: BaseModel, device: torch.device, config: RunConfig) -> nn.Module:
    """A copy of the frozen base on ``device``, in bfloat16 on CUDA where ``base-dtype`` asks."""
    model = copy_to(base.model, device)
    bf16 = device.type == "cuda" and config.base_dtype == "bfloat16"
    return model.to(torch.bfloat16) if bf16 else model


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
) -> dict:
    """Tokens/s of one peft LoRA model (the run's top rank, prepared as a client's) at
    ``batch_size`` rows a step, on partition 0's training examples; compilation happens in the
    untimed warm-up steps (its seconds are ``warmup_seconds``)."""
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
    prepare_for_training(model, config, device)
    optimizer = make_optimizer(
        model, config.learning_rate, config.weight_decay, fused=device.type == "cuda"
    )
    data = client_data(config, 0, num_partitions).train
    seed = client_seed(config.seed, 0, 1)
    drawn = list(
        batches(
            data,
            base.tokenizer,
            config.max_length,
            batch_size,
            seed,
            warmup + steps,
            config.task,
            pack=config.pack_sequences,
        )
    )
    cpu_bf16 = cpu_autocast(config)
    warmup_seconds = 0.0
    if warmup:
        warmup_seconds = train_local(
            model,
            drawn[:warmup],
            warmup,
            config.learning_rate,
            config.weight_decay,
            device,
            optimizer=optimizer,
            seed=seed,
            cpu_bf16=cpu_bf16,
        ).seconds
    report = train_local(
        model,
        drawn[warmup:],
        steps,
        config.learning_rate,
        config.weight_decay,
        device,
        optimizer=optimizer,
        seed=seed,
        cpu_bf16=cpu_bf16,
    )
    result = rate(tokens_of(drawn[warmup:]), report.seconds, batch_size, base, device)
    return {**result, "warmup_seconds": warmup_seconds}


def grouped_throughput(
    base: BaseModel,
    config: RunConfig,
    device: torch.device,
    group_size: int,
    num_partitions: int,
    steps: int,
    warmup: int,
) -> dict:
    """Tokens/s of partitions 0..group_size-1 (their ranks, data and seeds) trained as one group
    at ``batch-size`` rows each."""
    if group_size > num_partitions:
        raise ConfigError(f"a group of {group_size} clients, but the run has {num_partitions}")
    clients = range(group_size)
    ranks = [config.rank_for(client, num_partitions) for client in clients]
    group = fresh_group(
        base_on(base, device, config),
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
                    pack=config.pack_sequences,
                )
            )
        )
    fused, cpu_bf16 = device.type == "cuda", cpu_autocast(config)
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
            cpu_bf16=cpu_bf16,
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
        cpu_bf16=cpu_bf16,
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
