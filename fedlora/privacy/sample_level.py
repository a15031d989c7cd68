"""Sample-level differential privacy: Opacus DP-SGD on a client's trainable parameters.

A client's plan (`client_plan`) follows from the run config and its N_i training examples:

- sample rate q_i = 1 / ceil(N_i / batch-size), Opacus' rule (one over the number of batches of
  the client's DataLoader); with ``dp-poisson-sampling`` each step draws every example with
  probability q_i, else it takes a shuffled batch of ``batch-size``;
- delta_i = min(dp-delta, 1 / N_i): a larger ``dp-delta`` is capped for that client, not
  refused (a smaller delta is a stronger guarantee; the reply reports the delta used);
- noise multiplier sigma: ``dp-noise-multiplier``, or with ``dp-target-epsilon`` > 0 the one
  Opacus' ``get_noise_multiplier`` finds (epsilon within 0.01 below the target) for the whole
  run: ``dp-rounds`` (0: ``num-server-rounds``) x ``local-steps`` steps, plus ``local-steps``
  for Fed-SB's initialisation, all at rate q_i.

The accountant (``rdp`` or ``prv``) is Opacus': its history [(sigma, q, steps), ...] is what a
node carries across rounds (`fedlora.privacy.accounting.history_to_values`), so epsilon counts every step the client took in
the rounds it trained in. `private_training` makes the model private in place (Opacus' hooks,
removed afterwards, so that a cached model comes back as it was) and trains with `ExampleLoss`,
the per-example loss averaged over the batch; a causal LM's token losses are averaged per
sequence first, so that a sequence is the privacy unit. The noise comes from torch's generator
(Opacus' ``secure_mode`` off), seeded by the caller for reproducible runs.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import datasets
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from fedlora.config import RunConfig
from fedlora.data.encoding import encode
from fedlora.data.instructions import IGNORED_LABEL
from fedlora.errors import ConfigError
from fedlora.privacy.accounting import History, epsilon_of, extended
from fedlora.privacy.opacus_logging import opacus_module
from fedlora.rules import RULES

EPSILON_KEY = "epsilon"
"""Reply metric: the client's epsilon after the round (at its delta)."""
DELTA_KEY = "delta"
"""Reply metric: the client's delta, min(dp-delta, 1 / N_i)."""
BUDGET_SPENT_KEY = "dp-budget-spent"
"""Reply metric: 1 when the client did not train because it would pass ``max-epsilon``."""
SPENT_BEFORE_KEY = "dp-spent-before"
"""Train payload config: 1 when the server has seen the client spend privacy budget before, so
that a client whose accountant history is missing refuses to train instead of counting from 0."""
NOISE_TOLERANCE = 0.01
"""Epsilon tolerance of the noise search in target-epsilon mode (Opacus' default)."""

Batch = Mapping[str, Tensor]
LossFn = Callable[[nn.Module, Batch], Tensor]


@dataclass(frozen=True)
class PrivacyPlan:
    """One client's DP-SGD settings (see the module's docstring); ``max_epsilon`` 0: no cap."""

    noise_multiplier: float
    sample_rate: float
    delta: float
    max_grad_norm: float
    poisson_sampling: bool
    accountant: str
    grad_sample_mode: str
    max_epsilon: float = 0.0

    def epsilon(self, history: History) -> float:
        """Epsilon at the client's delta after the steps in ``history``."""
        return epsilon_of(history, self.delta, self.accountant)

    def epsilon_after(self, history: History, steps: int) -> float:
        """Epsilon after ``history`` and ``steps`` more steps of this plan."""
        return self.epsilon(extended(history, self.noise_multiplier, self.sample_rate, steps))

    def allows(self, history: History, steps: int) -> bool:
        """Whether ``steps`` more steps keep epsilon within ``max-epsilon`` (always, without)."""
        return self.max_epsilon == 0 or self.epsilon_after(history, steps) <= self.max_epsilon


def sample_rate(num_examples: int, batch_size: int) -> float:
    """q = 1 / ceil(N / batch size): Opacus' rate for a DataLoader of that batch size."""
    if num_examples < 1:
        raise ConfigError("no training examples: the client's train split is empty")
    return 1 / math.ceil(num_examples / batch_size)


def client_delta(delta: float, num_examples: int) -> float:
    """min(dp-delta, 1 / N_i)."""
    return min(delta, 1 / num_examples)


def planned_steps(config: RunConfig) -> int:
    """The DP-SGD steps a client takes over the run if it trains in ``dp-rounds`` rounds
    (0: every round), the method's initial training rounds included (Fed-SB's estimate)."""
    rounds = config.dp_rounds or config.num_server_rounds
    return (rounds + RULES[config.strategy].initial_training_rounds) * config.local_steps


def client_plan(config: RunConfig, num_examples: int) -> PrivacyPlan:
    """The plan of a client with ``num_examples`` training examples under ``config``."""
    rate = sample_rate(num_examples, config.batch_size)
    delta = client_delta(config.dp_delta, num_examples)
    noise = config.dp_noise_multiplier
    if config.dp_target_epsilon > 0:
        noise = noise_for_target(
            config.dp_target_epsilon, delta, rate, planned_steps(config), config.dp_accountant
        )
    return PrivacyPlan(
        noise_multiplier=noise,
        sample_rate=rate,
        delta=delta,
        max_grad_norm=config.dp_max_grad_norm,
        poisson_sampling=config.dp_poisson_sampling,
        accountant=config.dp_accountant,
        grad_sample_mode=config.dp_grad_sample_mode,
        max_epsilon=config.max_epsilon,
    )


@functools.lru_cache(maxsize=64)
def noise_for_target(
    target_epsilon: float, delta: float, rate: float, steps: int, accountant: str
) -> float:
    """The noise multiplier whose epsilon after ``steps`` steps at rate ``rate`` is at most
    ``target_epsilon`` (and within `NOISE_TOLERANCE` of it): Opacus' ``get_noise_multiplier``."""
    try:
        return opacus_module("opacus.accountants.utils").get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=NOISE_TOLERANCE,
        )
    except ValueError as error:
        raise ConfigError(
            f"dp-target-epsilon = {target_epsilon}: no noise multiplier reaches it over "
            f"{steps} steps at sample rate {rate:.4g} and delta {delta:.3g} ({error})"
        ) from error


# ---- DP-SGD ---------------------------------------------------------------------------------------


def check_supported(model: nn.Module) -> None:
    """Refuse a model whose trainable modules Opacus computes no exact per-example gradients
    for (peft DoRA's magnitude, VeRA's vectors, ...), instead of training it without privacy."""
    samplers = opacus_module("opacus.grad_sample").GradSampleModule.GRAD_SAMPLERS
    unsupported = sorted(
        f"{name} ({type(module).__name__})"
        for name, module in model.named_modules()
        if any(p.requires_grad for p in module.parameters(recurse=False))
        and type(module) not in samplers
    )
    if unsupported:
        raise ConfigError(
            "dp-sample: Opacus has no per-example gradients for the trainable module(s) "
            f"{unsupported}; peft DoRA and VeRA cannot be trained with DP-SGD: use plain LoRA, "
            "or switch dp-sample off"
        )


class ExampleLoss(nn.Module):
    """Cross-entropy per example, reduced by ``reduction`` (``mean`` or ``none``, which Opacus'
    ghost clipping sets): the class for classification; for a causal LM the next-token losses
    over a sequence's non-padding targets, averaged per sequence."""

    def __init__(self, task: str, reduction: str = "mean") -> None:
        super().__init__()
        self.task, self.reduction = task, reduction

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.task == "causal-lm":
            logits, labels = logits[:, :-1], labels[:, 1:]
            tokens = F.cross_entropy(
                logits.transpose(1, 2), labels, ignore_index=IGNORED_LABEL, reduction="none"
            )
            counts = (labels != IGNORED_LABEL).sum(dim=1).clamp(min=1)
            losses = tokens.sum(dim=1) / counts
        else:
            losses = F.cross_entropy(logits, labels, reduction="none")
        return losses if self.reduction == "none" else losses.mean()


class ExampleIndices(Dataset):
    """The indices 0..n-1 of a client's examples, as 1-tuples (Opacus' loader reads an item as
    a tuple of fields); the loader's collate function encodes them."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[int]:
        return (index,)


def example_loader(data: datasets.Dataset, tokenizer, config: RunConfig, seed: int) -> DataLoader:
    """Shuffled batches of ``batch-size`` examples of ``data`` (seeded), encoded for the task:
    what `private_training` turns into Poisson sampling at rate 1 / len(loader)."""
    if len(data) == 0:
        raise ConfigError("no training examples: the client's train split is empty")

    def collate(items: list[tuple[int]]) -> dict[str, Tensor]:
        indices = [index for (index,) in items]
        return encode(data[indices], tokenizer, config.max_length, config.task)

    return DataLoader(
        ExampleIndices(len(data)),
        batch_size=config.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=collate,
    )


@dataclass
class PrivateRun:
    """What `private_training` yields: Opacus' DP optimizer, the loss to train with, the
    (Poisson) loader and the accountant, which counts every optimizer step."""

    optimizer: torch.optim.Optimizer
    criterion: Callable[[Tensor, Tensor], Tensor]
    loader: DataLoader
    accountant: object

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """The criterion on the model's logits for the batch (its labels left out of the call)."""
        inputs = {key: tensor for key, tensor in batch.items() if key != "labels"}
        return self.criterion(model(**inputs).logits, batch["labels"])

    def batches(self, steps: int) -> Iterator[Batch]:
        """``steps`` batches, passing over the loader again as often as needed."""
        taken = 0
        while taken < steps:
            for batch in self.loader:
                if taken == steps:
                    return
                taken += 1
                yield batch

    @property
    def history(self) -> History:
        return list(self.accountant.history)


@contextmanager
def private_training(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    plan: PrivacyPlan,
    history: History,
    task: str,
) -> Iterator[PrivateRun]:
    """Make ``model`` (already on its device), ``optimizer`` (over its trainable parameters)
    and ``loader`` private with Opacus for the block; the accountant starts from ``history``.
    The model is hooked in place, not wrapped; the hooks and Opacus' per-example state are
    removed when the block ends."""
    check_supported(model)
    unsupported = opacus_module("opacus.validators.errors").UnsupportedModuleError
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = opacus_module("opacus").PrivacyEngine(accountant=plan.accountant)
    if history:
        engine.accountant.load_state_dict({"history": history, "mechanism": plan.accountant})
    training = model.training
    model.train()  # Opacus validates a model in training mode; the caller's mode comes back
    try:
        private = engine.make_private(
            module=model,
            optimizer=optimizer,
            criterion=ExampleLoss(task),
            data_loader=loader,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm,
            poisson_sampling=plan.poisson_sampling,
            grad_sample_mode=plan.grad_sample_mode,
            wrap_model=False,
        )
    except (unsupported, NotImplementedError) as error:
        raise ConfigError(f"dp-sample: Opacus cannot make this model private: {error}") from error
    finally:
        model.train(training)
    if plan.grad_sample_mode == "ghost":
        hooks, private_optimizer, criterion, private_loader = private
    else:
        (hooks, private_optimizer, private_loader), criterion = private, ExampleLoss(task)
    try:
        yield PrivateRun(private_optimizer, criterion, private_loader, engine.accountant)
    finally:
        private_optimizer.zero_grad(set_to_none=True)
        hooks.cleanup()
