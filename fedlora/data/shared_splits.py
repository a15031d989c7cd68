"""The clients' splits computed once per run and shared by the workers through the run directory.

The process that starts a simulation writes every partition's train and test rows (positions in
the federated set, in the order `fedlora.data.partitioning.client_data` gives them) to
``RUN_DIR/splits/<key>.npz``; a worker that finds the file takes its clients' rows from it
instead of partitioning the data itself, so that it neither imports flwr-datasets nor runs the
partitioner. The key is the SHA-256 of all the splits depend on: the whole run config, the number
of partitions, the file's format, the versions of the libraries that draw them and the federated
set's content (its Arrow data, features included), so that a changed setting, library or data
never reads an older file. The run writes the file anew each time it starts (a resume too).

A worker without the file (another machine's run directory, a deployed node, the in-process
engine) partitions as before. A file it cannot use (unreadable, truncated, other arrays, rows out
of range) is refused with a warning naming the file and why, and the worker partitions as before:
the splits are the same either way, the file only saves the work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import zipfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pyarrow as pa

from fedlora.config import RunConfig
from fedlora.data.partitioning import client_rows, federated_set
from fedlora.run_records.atomic_files import write_bytes_atomic

logger = logging.getLogger(__name__)

SPLITS_DIR = "splits"
FORMAT = 1
"""The file's layout: ``key`` (the hex key); ``train`` and ``test``, every partition's rows one
after another (int64), and ``train-sizes`` and ``test-sizes``, how many rows each partition has."""
KEY_ARRAY = "key"
PARTS = ("train", "test")
ARRAYS = (KEY_ARRAY, *PARTS, *(f"{part}-sizes" for part in PARTS))
LIBRARIES = ("flwr-datasets", "datasets", "numpy")
"""The packages whose code draws the splits (partitioners, selection, seeded permutations)."""

Splits = dict[int, tuple[np.ndarray, np.ndarray]]
"""(train rows, test rows) by partition id."""


class DamagedSplits(ValueError):
    """A splits file whose contents are not what the key's file holds."""


def splits_key(config: RunConfig, num_partitions: int) -> str:
    """The hex SHA-256 of the run config, the number of partitions, `FORMAT`, the `LIBRARIES`'
    versions and the federated set's Arrow data (one chunk, schema and features included)."""
    settings = {
        "format": FORMAT,
        "partitions": num_partitions,
        "libraries": {name: version(name) for name in LIBRARIES},
        "config": dataclasses.asdict(config),
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    table = federated_set(config).with_format("arrow")[:].combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    digest.update(memoryview(sink.getvalue()))
    return digest.hexdigest()


def splits_path(run_dir: Path, key: str) -> Path:
    return run_dir / SPLITS_DIR / f"{key}.npz"


def write_splits(run_dir: Path, config: RunConfig, num_partitions: int) -> Path:
    """Every partition's rows in the run directory, written atomically; the splits files of other
    keys there are removed. Raises `fedlora.errors.ConfigError` where the data cannot be split
    (as a client would)."""
    key = splits_key(config, num_partitions)
    clients = [client_rows(config, i, num_partitions) for i in range(num_partitions)]
    arrays = {KEY_ARRAY: np.array(key)}
    for index, part in enumerate(PARTS):
        rows = [client[index] for client in clients]
        arrays[part] = np.concatenate(rows).astype(np.int64)
        arrays[f"{part}-sizes"] = np.array([len(r) for r in rows], dtype=np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path = splits_path(run_dir, key)
    write_bytes_atomic(path, buffer.getvalue())
    for other in path.parent.glob("*.npz"):
        if other != path:
            other.unlink(missing_ok=True)
    return path


def read_splits(run_dir: Path, config: RunConfig, num_partitions: int) -> Splits | None:
    """The rows of every partition from the run's splits file for this config; None when there
    is none, or it cannot be read or is damaged (with a warning: the caller partitions itself)."""
    path = splits_path(run_dir, splits_key(config, num_partitions))
    try:
        with zipfile.ZipFile(path) as archive:
            return checked_splits(archive, path.stem, num_partitions, len(federated_set(config)))
    except FileNotFoundError:
        return None
    except OSError as error:
        logger.warning("splits file %s cannot be read (%s); partitioning here", path, error)
    except (DamagedSplits, ValueError, EOFError, zipfile.BadZipFile) as error:
        logger.warning("splits file %s refused, damaged: %s; partitioning here", path, error)
    return None


def checked_splits(
    archive: zipfile.ZipFile, key: str, num_partitions: int, num_rows: int
) -> Splits:
    """The archive's splits, checked: it holds the `ARRAYS` (their CRCs checked as they are
    read), the key is ``key``, the rows are 1-D int64 arrays in 0..num_rows-1 of which no row is
    given twice, and the sizes are ``num_partitions`` counts that add up to them."""
    names = {name.removesuffix(".npy") for name in archive.namelist()}
    if names != set(ARRAYS):
        missing, unexpected = sorted(set(ARRAYS) - names), sorted(names - set(ARRAYS))
        raise DamagedSplits(f"arrays missing {missing}, unexpected {unexpected[:3]}")
    arrays = {name: stored_array(archive, name) for name in ARRAYS}
    if str(arrays.pop(KEY_ARRAY)) != key:
        raise DamagedSplits("its stored key is not its name")
    if any(array.ndim != 1 or array.dtype != np.int64 for array in arrays.values()):
        raise DamagedSplits("rows and sizes must be 1-D int64 arrays")
    every = np.concatenate([arrays[part] for part in PARTS])
    if every.size and (every.min() < 0 or every.max() >= num_rows):
        raise DamagedSplits(f"rows outside 0..{num_rows - 1}")
    if np.unique(every).size != every.size:
        raise DamagedSplits("a row is given twice")
    split = {}
    for part in PARTS:
        sizes = arrays[f"{part}-sizes"]
        if len(sizes) != num_partitions or (sizes < 0).any() or sizes.sum() != len(arrays[part]):
            raise DamagedSplits(f"{part}-sizes are not {num_partitions} counts of its rows")
        split[part] = np.split(arrays[part], np.cumsum(sizes)[:-1])
    return {i: (split["train"][i], split["test"][i]) for i in range(num_partitions)}


def stored_array(archive: zipfile.ZipFile, name: str) -> np.ndarray:
    with archive.open(f"{name}.npy") as member:
        return np.lib.format.read_array(member, allow_pickle=False)
