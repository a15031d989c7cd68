"""Logits only where a causal LM's loss reads them.

An instruction example is labelled on its response alone, so a batch's positions before its first
labelled token feed no loss: their logits (the LM head over the whole vocabulary, a fifth of
SmolLM2-135M's forward at 128 tokens) are not computed. transformers' ``logits_to_keep = k`` gives
the logits of the last k positions; the labels are cut to the same k columns, so the next-token
pairs (logits[:, :-1], labels[:, 1:]) and every loss and score over them stay as they were.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping

from torch import Tensor, nn
from transformers import PreTrainedModel

from fedlora.data.instructions import IGNORED_LABEL

KEEP_KEY = "logits_to_keep"


def labelled_window(model: nn.Module, batch: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """``batch`` with ``logits_to_keep`` = width - first + 1 and its labels cut to those last
    columns, where ``first`` is the first column holding a label (its prediction is the logit one
    position earlier); ``batch`` itself where nothing is saved: class labels, text labelled from
    its start, or a model whose forward takes no ``logits_to_keep``."""
    labels = batch.get("labels")
    if labels is None or labels.dim() != 2 or not keeps_logits(model):
        return batch
    labelled = (labels != IGNORED_LABEL).any(dim=0).nonzero()
    if len(labelled) == 0:
        return batch
    width = labels.shape[1]
    keep = width - int(labelled[0]) + 1
    if keep >= width:
        return batch
    return {**batch, "labels": labels[:, width - keep :], KEEP_KEY: keep}


def keeps_logits(model: nn.Module) -> bool:
    """Whether the transformers model in ``model`` (itself, or wrapped by peft, Opacus or a
    grouped LoRA) takes ``logits_to_keep``."""
    inner = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    return inner is not None and _takes_keep(type(inner))


@functools.cache
def _takes_keep(model_class: type) -> bool:
    return KEEP_KEY in inspect.signature(model_class.forward).parameters
