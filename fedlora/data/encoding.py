"""Examples as model inputs: the task a dataset holds, its rows encoded as tensors, and the seeded
batches of local training (an instruction dataset's grouped by length, `fedlora.data.bucketing`)."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator

import datasets
import numpy as np
import torch
from torch import Tensor

from fedlora.data.bucketing import length_grouped_batches
from fedlora.data.columns import INSTRUCTION, LABEL, TEXT
from fedlora.data.instructions import IGNORED_LABEL, collate, examples_ids
from fedlora.data.packing import pack_texts
from fedlora.errors import ConfigError

TokenIds = list[tuple[list[int], int]]

_ENCODED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Examples already tokenized: dataset -> tokenizer -> (what, max_length) -> ids."""


def once_per_dataset(data: datasets.Dataset, tokenizer, key: tuple, compute: Callable):
    """``compute()``, computed once per dataset object, tokenizer and ``key``: a client's rows
    (immutable Arrow tables, held by its worker) are tokenized in its first round, not in every
    round. The dataset and tokenizer are held weakly: nothing outlives them."""
    per_tokenizer = _ENCODED.setdefault(data, weakref.WeakKeyDictionary())
    per_key = per_tokenizer.setdefault(tokenizer, {})
    if key not in per_key:
        per_key[key] = compute()
    return per_key[key]


def instruction_ids(data: datasets.Dataset, tokenizer, max_length: int) -> TokenIds:
    """`examples_ids` of every row of ``data``, once per dataset, tokenizer and ``max_length``."""
    return once_per_dataset(
        data,
        tokenizer,
        ("instructions", max_length),
        lambda: examples_ids(data[:], tokenizer, max_length),
    )


def packed_rows(data: datasets.Dataset, tokenizer, max_length: int) -> Tensor:
    """`fedlora.data.packing.pack_texts` of ``data``'s texts, once per dataset, tokenizer and
    ``max_length``."""
    return once_per_dataset(
        data,
        tokenizer,
        ("packed", max_length),
        lambda: pack_texts(data[TEXT], tokenizer, max_length),
    )


def infer_task(data: datasets.Dataset) -> str:
    if INSTRUCTION in data.column_names:
        return "causal-lm"
    return "classification" if LABEL in data.column_names else "causal-lm"


def is_instruction_data(data: datasets.Dataset, task: str) -> bool:
    return task == "causal-lm" and INSTRUCTION in data.column_names


def encode(rows: dict[str, list], tokenizer, max_length: int, task: str) -> dict[str, Tensor]:
    """A batch of rows as model inputs with ``labels``: the class, or the next tokens (causal LM;
    padding positions get -100, and an instruction's prompt positions too)."""
    if task == "causal-lm" and INSTRUCTION in rows:
        return causal_inputs(
            collate(examples_ids(rows, tokenizer, max_length), tokenizer.pad_token_id)
        )
    inputs = dict(
        tokenizer(
            list(rows[TEXT]),
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
    )
    if task == "classification":
        inputs["labels"] = torch.tensor(rows[LABEL], dtype=torch.long)
    else:
        labels = inputs["input_ids"].clone()
        labels[inputs["attention_mask"] == 0] = IGNORED_LABEL
        inputs["labels"] = labels
        return causal_inputs(inputs)
    return inputs


def causal_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """A causal LM's batch without its attention mask where the mask only pads rows on the right.

    A causal LM's position attends to itself and earlier positions only, so no real position sees
    the padding after it, and padding carries no label: the mask changes nothing that is trained
    or measured. Without it PyTorch's SDPA takes its causal (flash) kernel, under torch.compile
    too, instead of the masked kernel over a materialised width x width mask. A batch padded on
    the left keeps its mask."""
    mask = batch["attention_mask"]
    if bool((mask[:, 1:] <= mask[:, :-1]).all()):
        return {key: tensor for key, tensor in batch.items() if key != "attention_mask"}
    return batch


def batches(
    data: datasets.Dataset,
    tokenizer,
    max_length: int,
    batch_size: int,
    seed: int,
    steps: int,
    task: str | None = None,
    pack: bool = False,
) -> Iterator[dict[str, Tensor]]:
    """``steps`` training batches drawn without replacement, reshuffled (seeded) each epoch;
    instruction examples are tokenized once (`instruction_ids`) and grouped by length
    (`fedlora.data.bucketing`); with ``pack`` (causal LM on text), the batches are packed rows of
    ``max_length`` tokens (`packed_rows`), every position labelled.

    ``task`` defaults to causal LM for instruction data, else to classification when the data has
    a ``label`` column, else to causal LM.
    """
    if len(data) == 0:
        raise ConfigError("no training examples: the client's train split is empty")
    task = task or infer_task(data)
    rng = np.random.default_rng(seed)
    if pack:
        check_packable(data, task)
        rows = packed_rows(data, tokenizer, max_length)
        for chosen in seeded_epochs(len(rows), batch_size, steps, rng):
            yield {"input_ids": rows[chosen], "labels": rows[chosen]}
        return
    if is_instruction_data(data, task):
        examples = instruction_ids(data, tokenizer, max_length)
        order = length_grouped_batches([len(ids) for ids, _ in examples], batch_size, rng)
        for _, chosen in zip(range(steps), order, strict=False):
            yield causal_inputs(collate([examples[i] for i in chosen], tokenizer.pad_token_id))
        return
    for chosen in seeded_epochs(len(data), batch_size, steps, rng):
        yield encode(data[chosen.tolist()], tokenizer, max_length, task)


def seeded_epochs(
    count: int, batch_size: int, steps: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """``steps`` batches of indices into ``count`` items, drawn without replacement from a
    permutation of all of them, a new one (from ``rng``) each epoch."""
    stream = np.empty(0, dtype=np.int64)
    for _ in range(steps):
        while len(stream) < batch_size:
            stream = np.concatenate([stream, rng.permutation(count)])
        chosen, stream = stream[:batch_size], stream[batch_size:]
        yield chosen


def check_packable(data: datasets.Dataset, task: str) -> None:
    """``pack-sequences`` packs causal-LM text; anything else is refused, saying why."""
    if task != "causal-lm":
        raise ConfigError(f"pack-sequences packs text for causal-LM training, not task {task!r}")
    if is_instruction_data(data, task):
        raise ConfigError(
            "pack-sequences packs text, not instruction data: an instruction's example keeps its "
            "own row (its prompt is masked from the loss)"
        )


def ordered_batches(
    data: datasets.Dataset, tokenizer, max_length: int, batch_size: int, task: str | None = None
) -> Iterator[dict[str, Tensor]]:
    """Every example once, for evaluation: in order, instruction examples by length."""
    task = task or infer_task(data)
    if is_instruction_data(data, task):
        examples = instruction_ids(data, tokenizer, max_length)
        order = np.argsort([-len(ids) for ids, _ in examples], kind="stable")
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            yield causal_inputs(collate([examples[i] for i in chosen], tokenizer.pad_token_id))
        return
    for start in range(0, len(data), batch_size):
        yield encode(data[start : start + batch_size], tokenizer, max_length, task)
