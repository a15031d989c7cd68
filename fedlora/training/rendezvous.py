"""Where an engine trains several clients together: a client about to train hands its job to the
group slot it runs in and waits; the engine trains the parked jobs of a group in one
forward/backward per step (`fedlora.training.grouped.train_jobs_together`) and hands each its
report back.

A slot is the engine's thread for one client (`current_slot`); code outside a slot, or a run
whose training cannot be grouped (`groupable`), trains alone as before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor, nn

from fedlora.config import RunConfig

if TYPE_CHECKING:
    from fedlora.training.local import TrainReport


@dataclass
class TrainingJob:
    """What a client's round of local training needs, and how it trains alone."""

    model: nn.Module
    batches: Sequence[Mapping[str, Tensor]]
    steps: int
    learning_rates: Sequence[float]
    seed: int
    config: RunConfig
    alone: Callable[[], TrainReport]


class GroupSlot:
    """One client's place in a group: its thread parks a job here and resumes with its report
    (or the error that training it raised)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.job: TrainingJob | None = None
        self.report: TrainReport | None = None
        self.error: BaseException | None = None
        self.parked_or_done = threading.Event()
        self.resumed = threading.Event()

    def hand_over(self, job: TrainingJob) -> TrainReport:
        """Park ``job`` until the engine has trained it; its report."""
        self.job = job
        self.parked_or_done.set()
        self.resumed.wait()
        if self.error is not None:
            raise self.error
        assert self.report is not None
        return self.report

    def resume(self, report: TrainReport | None = None, error: BaseException | None = None):
        self.report, self.error = report, error
        self.resumed.set()


CURRENT_SLOT: ContextVar[GroupSlot | None] = ContextVar("current_slot", default=None)


def current_slot() -> GroupSlot | None:
    """The group slot this thread's client runs in, if an engine groups its training."""
    return CURRENT_SLOT.get()


def groupable(config: RunConfig) -> bool:
    """Whether a client of ``config`` can train in a group: plain LoRA steps (no sample-level DP,
    no FedProx term, no gradient accumulation or checkpointing, no compiled model)."""
    return not (
        config.dp_sample
        or config.fedprox_mu > 0
        or config.gradient_accumulation_steps > 1
        or config.gradient_checkpointing
        or config.torch_compile != "none"
    )
