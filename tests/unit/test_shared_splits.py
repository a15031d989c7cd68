"""The clients' splits written once per run and read by the workers: the same splits (and token
ids) as a worker's own partitioning, never the file of another setting, data or library version,
a damaged or unreadable file refused (the worker then partitions itself)."""

import logging
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch

from clients.worker import Worker
from fedlora.config import RunConfig
from fedlora.data import partitioning, shared_splits
from fedlora.data.encoding import batches
from fedlora.data.shared_splits import read_splits, splits_key, splits_path, write_splits
from fedlora.models.base_model import load_base_model
from simulations.runner import share_splits

CLIENTS = 6
TINY = {"model": "tiny-bert", "max_length": 32}


@pytest.fixture(autouse=True)
def fresh_caches():
    partitioning.clear_caches()
    yield
    partitioning.clear_caches()


@pytest.fixture
def csv_spec(tmp_path):
    """300 texts, labels cycling over 3 classes, as ``csv:PATH``."""
    path = tmp_path / "examples.csv"
    pd.DataFrame({"text": [f"text {i}" for i in range(300)], "label": np.arange(300) % 3}).to_csv(
        path, index=False
    )
    return f"csv:{path}"


def same_splits(shared, own) -> bool:
    return all(
        getattr(shared, part).to_dict() == getattr(own, part).to_dict()
        and getattr(shared, part).features == getattr(own, part).features
        for part in ("train", "test")
    )


@pytest.mark.parametrize(
    "settings",
    [
        {"partitioner": "iid"},
        {"partitioner": "dirichlet", "dirichlet_alpha": 0.3},
        {"partitioner": "shard", "num_shards_per_partition": 2},
        {"partitioner": "dirichlet", "data_seed": 7, "test_fraction": 0.3},
    ],
)
def test_the_shared_rows_give_every_client_its_own_splits(tmp_path, settings):
    config = RunConfig(**TINY, **settings)
    write_splits(tmp_path, config, CLIENTS)
    splits = read_splits(tmp_path, config, CLIENTS)
    for partition_id in range(CLIENTS):
        shared = partitioning.client_data_from_rows(config, *splits[partition_id])
        assert same_splits(shared, partitioning.client_data(config, partition_id, CLIENTS))


def test_a_separate_eval_dataset_shares_out_the_whole_dataset(tmp_path, csv_spec):
    config = RunConfig(**TINY, dataset=csv_spec, eval_dataset=csv_spec, partitioner="iid")
    write_splits(tmp_path, config, CLIENTS)
    splits = read_splits(tmp_path, config, CLIENTS)
    assert sum(len(train) + len(test) for train, test in splits.values()) == 300
    own = partitioning.client_data(config, 2, CLIENTS)
    assert same_splits(partitioning.client_data_from_rows(config, *splits[2]), own)


def test_a_worker_trains_on_the_same_token_ids_from_the_shared_rows(tmp_path, monkeypatch):
    config = RunConfig(**TINY, partitioner="dirichlet")
    tokenizer = load_base_model(config).tokenizer
    own = partitioning.client_data(config, 4, CLIENTS)
    write_splits(tmp_path, config, CLIENTS)
    monkeypatch.setattr("clients.worker.client_data", lambda *args: pytest.fail("partitioned"))
    shared = Worker(config).data(4, CLIENTS, tmp_path)

    def encoded(data):
        return list(batches(data.train, tokenizer, 32, batch_size=8, seed=1, steps=4))

    for mine, theirs in zip(encoded(own), encoded(shared), strict=True):
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[name], theirs[name]) for name in mine)


@pytest.mark.parametrize(
    "change", [{"max_length": 64}, {"seed": 1}, {"test_fraction": 0.5}, {"partitioner": "iid"}]
)
def test_a_changed_setting_never_reads_the_file(tmp_path, change):
    config = RunConfig(**TINY)
    write_splits(tmp_path, config, CLIENTS)
    changed = RunConfig(**{**TINY, **change})
    assert splits_key(changed, CLIENTS) != splits_key(config, CLIENTS)
    assert read_splits(tmp_path, changed, CLIENTS) is None
    assert splits_key(config, CLIENTS + 1) != splits_key(config, CLIENTS)
    assert read_splits(tmp_path, config, CLIENTS + 1) is None


def test_changed_data_never_reads_the_file(tmp_path, csv_spec):
    config = RunConfig(**TINY, dataset=csv_spec, partitioner="iid")
    write_splits(tmp_path / "run", config, CLIENTS)
    path = tmp_path / "examples.csv"
    frame = pd.read_csv(path)
    frame.loc[5, "text"] = "edited"
    frame.to_csv(path, index=False)
    partitioning.clear_caches()
    assert read_splits(tmp_path / "run", config, CLIENTS) is None


def test_other_library_versions_never_read_the_file(tmp_path, monkeypatch):
    config = RunConfig(**TINY)
    write_splits(tmp_path, config, CLIENTS)
    monkeypatch.setattr(shared_splits, "version", lambda name: "0.0")
    assert read_splits(tmp_path, config, CLIENTS) is None


def test_writing_removes_the_files_of_other_keys(tmp_path):
    first, second = RunConfig(**TINY), RunConfig(**TINY, seed=3)
    write_splits(tmp_path, first, CLIENTS)
    path = write_splits(tmp_path, second, CLIENTS)
    assert list((tmp_path / shared_splits.SPLITS_DIR).iterdir()) == [path]


def truncated(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path):
    path.write_bytes(b"not a zip file")


def flipped_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))


def rewritten(**change):
    def rewrite(path):
        with np.load(path) as arrays:
            contents = {name: arrays[name] for name in arrays.files}
        contents.update(change)
        np.savez(path.with_suffix(""), **{k: v for k, v in contents.items() if v is not None})

    return rewrite


def one_size_more(path):
    with np.load(path) as arrays:
        sizes = arrays["train-sizes"]
    rewritten(**{"train-sizes": sizes + np.eye(len(sizes), dtype=np.int64)[-1]})(path)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (truncated, "damaged"),
        (garbage, "damaged"),
        (flipped_byte, "damaged"),
        (rewritten(test=None), "arrays missing ['test'], unexpected []"),
        (rewritten(key=np.array("0" * 64)), "stored key is not its name"),
        (rewritten(train=np.array([0, 10**6])), "rows outside"),
        (rewritten(train=np.array([1.5])), "1-D int64"),
        (rewritten(test=np.array([0, 0])), "given twice"),
        (one_size_more, "train-sizes are not 6 counts of its rows"),
    ],
)
def test_a_damaged_file_is_refused_with_a_warning_and_the_worker_partitions(
    tmp_path, caplog, damage, reason
):
    config = RunConfig(**TINY, partitioner="iid")
    damage(write_splits(tmp_path, config, CLIENTS))
    with caplog.at_level(logging.WARNING, logger=shared_splits.__name__):
        assert read_splits(tmp_path, config, CLIENTS) is None
    (record,) = caplog.records
    assert "refused" in record.getMessage() and reason in record.getMessage()
    assert str(splits_path(tmp_path, splits_key(config, CLIENTS))) in record.getMessage()
    own = partitioning.client_data(config, 1, CLIENTS)
    assert same_splits(Worker(config).data(1, CLIENTS, tmp_path), own)


def test_a_run_directory_the_worker_cannot_read_leaves_it_to_partition(tmp_path, caplog):
    config = RunConfig(**TINY, partitioner="iid")
    own = partitioning.client_data(config, 0, CLIENTS)
    with caplog.at_level(logging.WARNING, logger=shared_splits.__name__):
        assert read_splits(tmp_path / "on-another-machine", config, CLIENTS) is None
    assert caplog.records == []
    splits_path(tmp_path, splits_key(config, CLIENTS)).mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger=shared_splits.__name__):
        assert read_splits(tmp_path, config, CLIENTS) is None
    assert "cannot be read" in caplog.records[0].getMessage()
    worker = Worker(config)
    assert same_splits(worker.data(0, CLIENTS, tmp_path / "on-another-machine"), own)
    assert same_splits(worker.data(1, CLIENTS, tmp_path), partitioning.client_data(config, 1, 6))


def test_data_that_cannot_be_split_is_left_for_the_clients_to_report(tmp_path, csv_spec):
    run_config = {"model": "tiny-bert", "dataset": csv_spec, "run-dir": str(tmp_path)}
    share_splits(run_config, num_partitions=1000)
    assert not (tmp_path / shared_splits.SPLITS_DIR).exists()


def test_the_file_is_a_plain_npz_of_int64_rows(tmp_path):
    path = write_splits(tmp_path, RunConfig(**TINY), CLIENTS)
    assert zipfile.is_zipfile(path)
    with np.load(path, allow_pickle=False) as arrays:
        assert sorted(arrays.files) == sorted(shared_splits.ARRAYS)
        assert {arrays[name].dtype for name in arrays.files if name != "key"} == {np.dtype("int64")}
        assert arrays["train-sizes"].sum() + arrays["test-sizes"].sum() == 2003
