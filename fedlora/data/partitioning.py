"""The server's held-out set and the clients' partitions of the rest.

The server's evaluation set is taken out first (seeded); the rest is the federated set, which a
flwr-datasets partitioner (IID, Dirichlet over labels, or label-sorted shards) splits over clients,
each of whom then holds out its own test split, seeded by (seed, partition id); ``data-seed``, when
set, seeds all of these instead of ``seed``, so that runs of several seeds share their data. Every
example of the federated set belongs to exactly one client. Partitionings are cached per process.
flwr-datasets (0.5-1.4 s to import, with its plotting libraries) is imported only to partition: a
worker given its rows (`client_data_from_rows`, `fedlora.data.shared_splits`) never loads it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import datasets
import numpy as np

from fedlora.config import RunConfig
from fedlora.data.columns import LABEL
from fedlora.data.loading import (
    clear_loading_caches,
    load_dataset,
    load_eval_dataset,
    quiet_progress,
)
from fedlora.errors import ConfigError

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

SERVER_STREAM, CLIENT_STREAM = 0, 1
"""Seed streams: the server's hold-out draws from (seed, 0), client i's split from (seed, 1, i)."""
ROW_COLUMN = "fedlora-row"
"""The federated set's row positions, read to know which rows a partition holds."""


@dataclass(frozen=True)
class ClientData:
    """One client's examples: ``train`` for local steps, ``test`` for its own evaluation."""

    train: datasets.Dataset
    test: datasets.Dataset


def seeded_split(
    data: datasets.Dataset, fraction: float, seed: Sequence[int]
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(rest, held out): round(fraction * n) examples drawn with the seed (at least one if n > 1
    and fraction > 0), both in drawn order and materialised in memory."""
    return tuple(
        materialised(data, positions) for positions in split_order(len(data), fraction, seed)
    )


def split_order(size: int, fraction: float, seed: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The positions `seeded_split` gives (rest, held out) of ``size`` examples."""
    order = np.random.default_rng(list(seed)).permutation(size)
    held = round(fraction * size)
    if fraction > 0 and held == 0 and size > 1:
        held = 1
    return order[held:], order[:held]


def materialised(data: datasets.Dataset, rows: Sequence[int]) -> datasets.Dataset:
    """These rows of ``data``, in this order, in memory."""
    with quiet_progress():
        return data.select(rows).flatten_indices(keep_in_memory=True)


def split_server_eval(
    dataset: datasets.Dataset, config: RunConfig
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(federated, server_eval): ``server-eval-fraction`` of the dataset held out, seeded."""
    return seeded_split(
        dataset, config.server_eval_fraction, (config.partition_seed, SERVER_STREAM)
    )


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
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, ShardPartitioner

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
def _partitioner(config: RunConfig, num_partitions: int, numbered: bool = False) -> Partitioner:
    """The partitioner over the federated set, or (``numbered``) over its labels and row
    positions alone (`numbered_rows`), which it partitions alike."""
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
    partitioner.dataset = numbered_rows(federated) if numbered else federated
    return partitioner


def numbered_rows(federated: datasets.Dataset) -> datasets.Dataset:
    """The federated set's labels (if any) and row positions (`ROW_COLUMN`): all that a
    partitioner reads is the labels and the number of examples."""
    labels = [LABEL] if LABEL in federated.column_names else []
    return federated.select_columns(labels).add_column(ROW_COLUMN, np.arange(len(federated)))


def clear_caches() -> None:
    """Forget the loaded datasets and partitionings (e.g. after a dataset file changed)."""
    clear_loading_caches()
    for cached in (_federated_split, _partitioner):
        cached.cache_clear()


def partition(
    config: RunConfig, partition_id: int, num_partitions: int, numbered: bool = False
) -> datasets.Dataset:
    """Client ``partition_id``'s share of the federated set, before its train/test split
    (``numbered``: only its labels and its rows' positions, `numbered_rows`)."""
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition id {partition_id} outside 0..{num_partitions - 1}")
    partitioner = _partitioner(config, num_partitions, numbered)
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
    train, test = seeded_split(share, config.test_fraction, split_seed(config, partition_id))
    return ClientData(train=train, test=test)


def client_rows(
    config: RunConfig, partition_id: int, num_partitions: int
) -> tuple[np.ndarray, np.ndarray]:
    """The rows of the federated set that `client_data` gives the client, (train, test), each in
    its split's order."""
    rows = np.asarray(partition(config, partition_id, num_partitions, numbered=True)[ROW_COLUMN])
    rest, held = split_order(len(rows), config.test_fraction, split_seed(config, partition_id))
    return rows[rest], rows[held]


def client_data_from_rows(
    config: RunConfig, train: Sequence[int], test: Sequence[int]
) -> ClientData:
    """The client's splits from its rows of the federated set (`client_rows`): what `client_data`
    gives, without partitioning."""
    federated = federated_set(config)
    return ClientData(train=materialised(federated, train), test=materialised(federated, test))


def split_seed(config: RunConfig, partition_id: int) -> tuple[int, int, int]:
    """The seed of a client's train/test split."""
    return (config.partition_seed, CLIENT_STREAM, partition_id)
