"""Local training and evaluation of a client's model, on the GPU when there is one.

On CUDA the forward passes run under bf16 autocast (the weights float32, or the frozen ones
bfloat16: `fedlora.training.speed`) and AdamW is PyTorch's fused kernel; on the CPU in float32, or
under bf16 autocast where ``cpu-autocast`` asks (`cpu_autocast`). Training draws its dropout masks
from ``seed`` when one is given, so a client's round is reproducible. An optimizer step may
accumulate the gradients of several batches, each batch's loss weighted by its share of the step's
loss targets, so that the step equals one on all of them together; its learning rate follows the
run's schedule (`fedlora.training.lr_schedule`). `train_private` runs the same steps as DP-SGD
(`fedlora.privacy`): Opacus' per-example clipping and noise on a (Poisson-sampled) loader over the
client's examples.
"""

from __future__ import annotations

import contextlib
import itertools
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import datasets
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlora.config import RunConfig
from fedlora.data.encoding import IGNORED_LABEL, batches, ordered_batches
from fedlora.errors import ConfigError
from fedlora.privacy.accounting import History
from fedlora.privacy.sample_level import PrivacyPlan, example_loader, private_training
from fedlora.training.logits_window import labelled_window
from fedlora.training.lr_schedule import round_learning_rates
from fedlora.training.rendezvous import TrainingJob, current_slot, groupable


@dataclass(frozen=True)
class TrainReport:
    """Mean training loss over the steps, examples processed (steps x batch), wall seconds, and
    when training started (``time.time()``)."""

    loss: float
    num_examples: int
    seconds: float
    started_at: float


@dataclass(frozen=True)
class EvalReport:
    """Loss and accuracy (of the class, or of the next token for a causal LM) over
    ``num_examples`` examples; both 0 when there are none."""

    loss: float
    accuracy: float
    num_examples: int


def device_for(config: RunConfig) -> torch.device:
    """``device``: auto is CUDA when available, else the CPU; asking for absent CUDA is an error."""
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device = {config.device!r}, but CUDA is not available")
    return torch.device(config.device)


def set_torch_threads(config: RunConfig) -> None:
    """Give torch ``num-threads`` intra-op threads (clients sharing cores each take few)."""
    torch.set_num_threads(config.num_threads)


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, fused: bool = False
) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters only (PyTorch's fused kernel if ``fused``)."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if not trainable:
        raise ConfigError("the model has no trainable parameters")
    return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, fused=fused or None)


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX tiles or AVX512-BF16); elsewhere bf16
    products are emulated, slower than float32 ones."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def cpu_autocast(config: RunConfig) -> bool:
    """Whether the run's forward passes on the CPU run under bf16 autocast: ``cpu-autocast`` is
    bfloat16, or auto on a CPU that multiplies bfloat16 natively outside DP-SGD (which keeps
    float32)."""
    mode = config.cpu_autocast
    return mode == "bfloat16" or (mode == "auto" and not config.dp_sample and native_cpu_bf16())


def autocast(device: torch.device, cpu_bf16: bool = False) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, and on the CPU where ``cpu_bf16``; nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16 and device.type == "cpu")


@contextlib.contextmanager
def seeded_rng(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch's generators for the block (restored afterwards); no-op for ``seed=None``."""
    if seed is None:
        yield
        return
    devices = []
    if device.type == "cuda":
        devices = [torch.cuda.current_device() if device.index is None else device.index]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def to_device(batch: Mapping[str, Tensor | int], device: torch.device) -> dict[str, Tensor | int]:
    """The batch's tensors on ``device``; its other values (``logits_to_keep``) as they are."""
    return {
        key: value.to(device, non_blocking=True) if isinstance(value, Tensor) else value
        for key, value in batch.items()
    }


def client_seed(run_seed: int, partition_id: int, server_round: int) -> int:
    """The seed of client ``partition_id``'s round ``server_round``: its batches, dropout masks
    and DP noise draw from it."""
    return zlib.crc32(f"{run_seed}:{partition_id}:{server_round}".encode())


def learning_rates(config: RunConfig, server_round: int) -> list[float]:
    """The learning rate of each of a client's local steps in round ``server_round``."""
    return round_learning_rates(
        config.learning_rate,
        server_round,
        config.local_steps,
        config.num_server_rounds,
        config.warmup_steps,
        config.lr_schedule,
    )


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each layer's activations in the backward pass instead of keeping them
    (transformers' gradient checkpointing, non-reentrant so that frozen inputs need no grad)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None:
        enable = model.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def train_round(
    model: nn.Module,
    examples: datasets.Dataset,
    tokenizer,
    config: RunConfig,
    device: torch.device | str,
    seed: int,
    server_round: int = 1,
) -> TrainReport:
    """A client's round of plain local training: ``local-steps`` AdamW steps, each on
    ``gradient-accumulation-steps`` seeded batches of ``batch-size`` of its examples, at the
    schedule's learning rates for round ``server_round``, with FedProx's proximal term
    (``fedprox-mu``). In an engine's group slot (`fedlora.training.rendezvous`) the round is
    handed to the group, which trains it with the others."""
    accumulation = config.gradient_accumulation_steps
    training = batches(
        examples,
        tokenizer,
        config.max_length,
        config.batch_size,
        seed,
        config.local_steps * accumulation,
        config.task,
        pack=config.pack_sequences,
    )
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
    rates = learning_rates(config, server_round)
    slot = current_slot() if groupable(config) else None
    if slot is not None:
        training = list(training)

    def alone() -> TrainReport:
        return train_local(
            model,
            training,
            config.local_steps,
            config.learning_rate,
            config.weight_decay,
            device,
            seed=seed,
            accumulation_steps=accumulation,
            learning_rates=rates,
            proximal_mu=config.fedprox_mu,
            cpu_bf16=cpu_autocast(config),
        )

    if slot is None:
        return alone()
    return slot.hand_over(
        TrainingJob(model, training, config.local_steps, rates, seed, config, alone)
    )


def loss_targets(batch: Mapping[str, Tensor]) -> int:
    """How many targets a batch's mean loss averages: its examples (class labels), or its
    labelled next tokens (token labels, -100 ignored)."""
    labels = batch["labels"]
    if labels.dim() == 1:
        return len(labels)
    return int((labels[:, 1:] != IGNORED_LABEL).sum())


def batch_weights(group: Sequence[Mapping[str, Tensor]]) -> list[float]:
    """Each batch's share of a step's loss targets (equal shares if there are none)."""
    if len(group) == 1:
        return [1.0]
    counts = [loss_targets(batch) for batch in group]
    total = sum(counts)
    if total == 0:
        return [1.0 / len(group)] * len(group)
    return [count / total for count in counts]


def set_learning_rate(optimizer: torch.optim.Optimizer, rate: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = rate


def train_local(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    steps: int,
    lr: float,
    weight_decay: float,
    device: torch.device | str,
    optimizer: torch.optim.Optimizer | None = None,
    seed: int | None = None,
    loss_fn: Callable[[nn.Module, Mapping[str, Tensor]], Tensor] | None = None,
    accumulation_steps: int = 1,
    learning_rates: Sequence[float] | None = None,
    proximal_mu: float = 0.0,
    cpu_bf16: bool = False,
) -> TrainReport:
    """``steps`` AdamW steps on the trainable parameters, each accumulating the gradients of the
    next ``accumulation_steps`` batches (each batch's loss weighted by `batch_weights`).

    FedProx (Li et al. 2020): with ``proximal_mu`` > 0 the loss gains (mu / 2) ||w - w_0||^2 over
    the trainable parameters w, w_0 their values when the round starts (what the client received),
    added as its gradient mu (w - w_0) before each step; the reported loss is the task's alone.

    The model is trained in train mode (dropout on) and left in eval mode. ``optimizer`` replaces
    the AdamW made here (e.g. an Opacus DP optimizer over the same parameters), ``loss_fn``
    the model's own loss (``model(**batch).loss``), ``learning_rates`` (one per step) ``lr``;
    ``cpu_bf16``: the forward passes on the CPU under bf16 autocast. The reported loss of a step
    is the weighted sum of its batches' losses.
    """
    device = torch.device(device)
    optimizer = optimizer or make_optimizer(model, lr, weight_decay, fused=device.type == "cuda")
    batches = iter(batches)
    losses, num_examples = [], 0
    anchors = [
        (parameter, parameter.detach().clone())
        for parameter in model.parameters()
        if parameter.requires_grad and proximal_mu > 0
    ]
    started_at, start = time.time(), time.perf_counter()
    model.train()
    try:
        with seeded_rng(seed, device):
            for step in range(steps):
                group = [
                    to_device(labelled_window(model, batch), device)
                    for batch in itertools.islice(batches, accumulation_steps)
                ]
                if not group:
                    break
                optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for batch, weight in zip(group, batch_weights(group), strict=True):
                    with autocast(device, cpu_bf16):
                        loss = model(**batch).loss if loss_fn is None else loss_fn(model, batch)
                    (loss * weight).backward()
                    step_loss = step_loss + loss.detach() * weight
                    num_examples += len(batch["labels"])
                add_proximal_gradient(anchors, proximal_mu)
                if learning_rates is not None:
                    set_learning_rate(optimizer, learning_rates[step])
                optimizer.step()
                losses.append(step_loss)
    finally:
        optimizer.zero_grad(set_to_none=True)
        model.eval()
    if not losses:
        raise ConfigError("no training batches")
    mean_loss = torch.stack(losses).float().mean().item()
    return TrainReport(
        loss=mean_loss,
        num_examples=num_examples,
        seconds=time.perf_counter() - start,
        started_at=started_at,
    )


@torch.no_grad()
def add_proximal_gradient(anchors: Sequence[tuple[Tensor, Tensor]], mu: float) -> None:
    """grad += mu (w - w_0) for every (w, w_0): the gradient of (mu / 2) ||w - w_0||^2."""
    for parameter, anchor in anchors:
        proximal = mu * (parameter - anchor)
        if parameter.grad is None:
            parameter.grad = proximal
        else:
            parameter.grad.add_(proximal)


def train_private(
    model: nn.Module,
    data: datasets.Dataset,
    tokenizer,
    config: RunConfig,
    plan: PrivacyPlan,
    history: History,
    device: torch.device | str,
    seed: int,
    server_round: int = 1,
) -> tuple[TrainReport, History]:
    """``local-steps`` DP-SGD steps (AdamW under Opacus) on ``data`` with the client's plan, at
    the schedule's learning rates for round ``server_round``; the report and the accountant's
    history, ``history`` followed by these steps."""
    optimizer = make_optimizer(model, config.learning_rate, config.weight_decay)
    loader = example_loader(data, tokenizer, config, seed)
    with private_training(model, optimizer, loader, plan, history, config.task) as run:
        report = train_local(
            model,
            run.batches(config.local_steps),
            config.local_steps,
            config.learning_rate,
            config.weight_decay,
            device,
            optimizer=run.optimizer,
            seed=seed,
            loss_fn=run.loss,
            learning_rates=learning_rates(config, server_round),
        )
    return report, run.history


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: datasets.Dataset,
    tokenizer,
    config: RunConfig,
    device: torch.device | str,
    batch_size: int | None = None,
) -> EvalReport:
    """Loss and accuracy over every example of ``data`` (in batches of ``batch_size``, by default
    the config's `RunConfig.evaluation_batch_size`).

    Classification: mean cross-entropy and accuracy over examples. Causal LM: mean next-token
    cross-entropy and next-token accuracy over the labelled target tokens (not padding; for
    instruction data, the response's tokens only).
    """
    if len(data) == 0:
        return EvalReport(loss=0.0, accuracy=0.0, num_examples=0)
    device = torch.device(device)
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    counted = torch.zeros((), dtype=torch.int64, device=device)
    cpu_bf16 = cpu_autocast(config)
    for batch in ordered_batches(
        data, tokenizer, config.max_length, batch_size or config.evaluation_batch_size, config.task
    ):
        batch = to_device(labelled_window(model, batch), device)
        labels = batch.pop("labels")
        with autocast(device, cpu_bf16):
            logits = model(**batch).logits.float()
        if config.task == "causal-lm":
            logits, labels = logits[:, :-1], labels[:, 1:]
        mask = labels != IGNORED_LABEL
        logits, labels = logits[mask], labels[mask]
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        correct += (logits.argmax(dim=-1) == labels).sum()
        counted += mask.sum()
    counted = max(counted.item(), 1)
    return EvalReport(
        loss=loss_sum.item() / counted,
        accuracy=correct.item() / counted,
        num_examples=len(data),
    )
