"""Local training of a group of clients in one forward/backward per step (`fedlora.models.grouped_lora`).

Each step stacks every client's next batch (padded on the right to the widest: masked, ignored
positions), runs the group once, and sums the clients' own mean losses; one AdamW steps the
group's stacked factors at the clients' common learning rate. AdamW is elementwise, so each
client's slice of the moments is its own, and client g's factors follow the steps
`fedlora.training.local.train_local` takes on its batches alone: the sum's gradient with respect
to client g's factors is its own loss's.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fedlora.data.encoding import IGNORED_LABEL
from fedlora.errors import ConfigError
from fedlora.lora.adapter import LoRAFactors
from fedlora.models.grouped_lora import GroupedLoRA, group_of_peft_models
from fedlora.models.peft_io import (
    DEFAULT_ADAPTER,
    ModelMismatchError,
    lora_layers,
    write_adapter,
    write_head,
)
from fedlora.training.local import (
    TrainReport,
    autocast,
    cpu_autocast,
    seeded_rng,
    set_learning_rate,
    to_device,
)
from fedlora.training.logits_window import labelled_window
from fedlora.training.rendezvous import TrainingJob


def stack_batches(group: Sequence[Mapping[str, Tensor]]) -> tuple[list[int], dict[str, Tensor]]:
    """Each batch's row count and the batches stacked along rows; 2-D tensors are padded on the
    right to the widest (labels with -100, everything else with 0: masked positions)."""
    keys = set(group[0])
    if any(set(batch) != keys for batch in group):
        raise ValueError("the clients' batches do not have the same keys")
    rows = [len(batch["labels"]) for batch in group]
    stacked = {}
    for key in group[0]:
        tensors = [batch[key] for batch in group]
        if tensors[0].dim() == 2:
            width = max(tensor.shape[1] for tensor in tensors)
            fill = IGNORED_LABEL if key == "labels" else 0
            tensors = [
                F.pad(tensor, (0, width - tensor.shape[1]), value=fill) for tensor in tensors
            ]
        stacked[key] = torch.cat(tensors)
    return rows, stacked


def client_losses(logits: Tensor, labels: Tensor, rows: Sequence[int]) -> list[Tensor]:
    """Each client's mean loss over its rows: cross-entropy of the class (1-D labels) or of the
    next token over the labelled positions (2-D labels, -100 ignored), as transformers computes it."""
    losses = []
    for part, target in zip(logits.split(rows), labels.split(rows), strict=True):
        if target.dim() == 2:  # transformers' causal-LM loss takes float32 logits
            part, target = part[:, :-1].float(), target[:, 1:]
        else:  # bf16 logits in float32, as autocast computes the loss alone
            part = part.to(torch.promote_types(part.dtype, torch.float32))
        losses.append(
            F.cross_entropy(
                part.reshape(-1, part.shape[-1]), target.reshape(-1), ignore_index=IGNORED_LABEL
            )
        )
    return losses


def make_group_optimizer(
    group: GroupedLoRA, lr: float, weight_decay: float, fused: bool = False
) -> torch.optim.AdamW:
    """One AdamW over the group's stacked factors and heads (elementwise: each client's slice of
    the moments is its own)."""
    return torch.optim.AdamW(
        group.trainable_parameters(), lr=lr, weight_decay=weight_decay, fused=fused or None
    )


def train_group(
    group: GroupedLoRA,
    client_batches: Sequence[Iterable[Mapping[str, Tensor]]],
    steps: int,
    lr: float,
    weight_decay: float,
    device: torch.device | str,
    seed: int | None = None,
    learning_rates: Sequence[float] | None = None,
    fused: bool = False,
    cpu_bf16: bool = False,
) -> list[TrainReport]:
    """``steps`` AdamW steps of every client of the group together, client g on
    ``client_batches[g]``; ``learning_rates`` (one per step, the clients' common schedule)
    replaces ``lr``; ``cpu_bf16``: the forward passes on the CPU under bf16 autocast. One report
    per client (the seconds are the group's). Left in eval mode."""
    device = torch.device(device)
    if len(client_batches) != group.num_clients:
        raise ValueError(f"{len(client_batches)} batch streams for {group.num_clients} clients")
    optimizer = make_group_optimizer(group, lr, weight_decay, fused)
    streams = [iter(batches) for batches in client_batches]
    losses: list[list[Tensor]] = [[] for _ in streams]
    examples = [0] * len(streams)
    started_at, start = time.time(), time.perf_counter()
    group.train()
    try:
        with seeded_rng(seed, device):
            for step in range(steps):
                batches = [next(stream, None) for stream in streams]
                if any(batch is None for batch in batches):
                    break
                rows, stacked = stack_batches(batches)
                stacked = to_device(labelled_window(group, stacked), device)
                labels = stacked.pop("labels")
                optimizer.zero_grad(set_to_none=True)
                with autocast(device, cpu_bf16):
                    logits = group(rows, **stacked).logits
                step_losses = client_losses(logits, labels, rows)
                torch.stack(step_losses).sum().backward()
                if learning_rates is not None:
                    set_learning_rate(optimizer, learning_rates[step])
                optimizer.step()
                for client, loss in enumerate(step_losses):
                    losses[client].append(loss.detach())
                    examples[client] += rows[client]
    finally:
        optimizer.zero_grad(set_to_none=True)
        group.eval()
    if not losses[0]:
        raise ConfigError("no training batches")
    seconds = time.perf_counter() - start
    return [
        TrainReport(
            loss=torch.stack(client).float().mean().item(),
            num_examples=count,
            seconds=seconds,
            started_at=started_at,
        )
        for client, count in zip(losses, examples, strict=True)
    ]


def train_jobs_together(jobs: Sequence[TrainingJob]) -> list[TrainReport]:
    """The jobs' models trained as one group (`train_group`), each model's factors and head then
    set to its trained ones; one report per job. The models must be peft LoRA copies of one frozen
    base (equal base weights: clients of one round hold the same global version) on one device,
    each with one rank and scale over its layers, the same learning rates and the same factors
    trained (FFA-LoRA's clients all keep A frozen); a group that does not fit is a ValueError,
    and nothing is trained."""
    models = [job.model for job in jobs]
    if not same_frozen_base(models):
        raise ValueError("the clients' frozen bases differ: they cannot train as one group")
    if any(list(job.learning_rates) != list(jobs[0].learning_rates) for job in jobs):
        raise ValueError("the clients' learning rates differ: they cannot train as one group")
    layers = [lora_layers(model) for model in models]
    trained = trained_factors(layers)
    config = jobs[0].config
    device = next(models[0].parameters()).device
    group = group_of_peft_models(copy.deepcopy(models[0]).unload(), models)
    for name, (train_A, train_B) in trained.items():
        group.layers[name].lora_A.requires_grad_(train_A)
        group.layers[name].lora_B.requires_grad_(train_B)
    reports = train_group(
        group,
        [job.batches for job in jobs],
        jobs[0].steps,
        config.learning_rate,
        config.weight_decay,
        device,
        seed=jobs[0].seed,
        learning_rates=jobs[0].learning_rates,
        fused=device.type == "cuda",
        cpu_bf16=cpu_autocast(config),
    )
    for client, (model, client_layers) in enumerate(zip(models, layers, strict=True)):
        trained = {
            name: LoRAFactors(A, B, float(client_layers[name].scaling[DEFAULT_ADAPTER]))
            for name, (A, B) in group.client_factors(client).items()
        }
        write_adapter(model, trained)
        write_head(
            model,
            {key: value.detach() for key, value in group.client_head_parameters(client).items()},
        )
    return reports


def trained_factors(
    layers: Sequence[Mapping[str, torch.nn.Module]],
) -> dict[str, tuple[bool, bool]]:
    """Whether A and B train, per module path, the same in every client's peft LoRA layers (a
    group steps each factor of all its clients at once); a ValueError where clients differ."""
    trained = {}
    for name in layers[0]:
        flags = {
            (
                client[name].lora_A[DEFAULT_ADAPTER].weight.requires_grad,
                client[name].lora_B[DEFAULT_ADAPTER].weight.requires_grad,
            )
            for client in layers
        }
        if len(flags) != 1:
            raise ValueError(
                f"{name}: some clients train a factor that others keep frozen: they cannot "
                "train as one group"
            )
        trained[name] = flags.pop()
    return trained


def same_base_groups(models: Sequence[torch.nn.Module]) -> list[list[int]]:
    """The models' indices split by equal frozen bases (`same_frozen_base`), each group in order of
    its first model: FedEx-LoRA's residual, for one, depends on the rank a client loads, so
    clients of one round share their base by rank class."""
    groups: list[list[int]] = []
    for index, model in enumerate(models):
        for group in groups:
            if same_frozen_base([models[group[0]], model]):
                group.append(index)
                break
        else:
            groups.append([index])
    return groups


def same_frozen_base(models: Sequence[torch.nn.Module]) -> bool:
    """Whether the peft models adapt the same modules over equal base weights (never for a model
    without peft LoRA layers, such as Fed-SB's)."""
    try:
        layers = [lora_layers(model) for model in models]
    except ModelMismatchError:
        return False
    first = layers[0]
    return all(
        other.keys() == first.keys()
        and all(
            torch.equal(other[name].get_base_layer().weight, first[name].get_base_layer().weight)
            for name in first
        )
        for other in layers[1:]
    )
