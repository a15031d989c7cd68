"""Greedy generation in batches, and the scores of generated answers against references.

`greedy_replies` pads prompts on the left, so that every row's next token follows its own prompt,
and stops a row at the tokenizer's EOS (the chat template's end of turn for chat models).

Answer matching (`answer_correct`, FlowerTune's convention for short answers): both texts are
normalised (`normalise`: lower case, every character that is neither a letter, a digit nor
whitespace replaced by a space, runs of whitespace made one space, ends stripped); the answer is
correct when the normalised reference is not empty and occurs in the normalised generation as
whole words (" business " in " the topic is business "): "Business." and "The topic is business"
both match "business", "businesses" does not.

ROUGE-L (`rouge_l`): the F1 of the longest common subsequence of words, as the ``rouge-score``
package computes it (its default tokenizer: lower case, letters and digits only; no stemming).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedlora.config import GENERATION_METRICS
from fedlora.errors import ConfigError

METRIC_COLUMNS = {"answer": "answer_accuracy", "rouge-l": "rouge_l"}
"""The metrics.jsonl column of each generation metric."""
TASK_METRICS = {"bbc-topic": "answer", "bbc-headline": "rouge-l"}
"""The generation metric of each packaged task; ``auto`` takes it, else ``answer``."""


def generation_metric(setting: str, dataset: str) -> str:
    """``answer`` or ``rouge-l``: the setting, or for ``auto`` the task's (default ``answer``)."""
    if setting not in GENERATION_METRICS:
        raise ConfigError(
            f"generation-metric = {setting!r}: choose one of {list(GENERATION_METRICS)}"
        )
    return TASK_METRICS.get(dataset, "answer") if setting == "auto" else setting


def normalise(text: str) -> str:
    """Lower case, punctuation and symbols as spaces, whitespace collapsed, ends stripped."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.lower()).split())


def answer_correct(generation: str, reference: str) -> bool:
    """Whether the normalised reference occurs as whole words in the normalised generation."""
    answer = normalise(reference)
    return bool(answer) and f" {answer} " in f" {normalise(generation)} "


@functools.cache
def rouge_l_scorer():
    """``rouge-score``'s ROUGE-L scorer without stemming (imported on first use, so that runs
    that never score ROUGE-L do not need the package)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(generation: str, reference: str) -> float:
    """ROUGE-L F1 of the generation against the reference (``rouge-score``, no stemming)."""
    return rouge_l_scorer().score(reference, generation)["rougeL"].fmeasure


@dataclass(frozen=True)
class GenerationScores:
    """The mean score over the examples, under the key of the metric that applies."""

    metric: str
    value: float

    @property
    def column(self) -> str:
        return METRIC_COLUMNS[self.metric]


def score(metric: str, generations: Sequence[str], references: Sequence[str]) -> GenerationScores:
    """The mean of `answer_correct` (as 0/1) or of `rouge_l` over the pairs (0 for none)."""
    one = {"answer": answer_correct, "rouge-l": rouge_l}[metric]
    values = [float(one(g, r)) for g, r in zip(generations, references, strict=True)]
    return GenerationScores(metric, sum(values) / len(values) if values else 0.0)


def left_padded(prompts: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of the prompts, padded on the left to the longest."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def greedy_replies(
    model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int
) -> list[str]:
    """The model's greedy continuation of each prompt (token ids), decoded without special
    tokens and stripped; ``batch_size`` prompts at a time, each row stopping at EOS."""
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    replies = []
    for start in range(0, len(prompts), batch_size):
        batch = left_padded(prompts[start : start + batch_size], pad)
        output = model.generate(
            **{key: tensor.to(device) for key, tensor in batch.items()},
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad,
        )
        width = batch["input_ids"].shape[1]
        replies += [
            tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in output
        ]
    return replies
