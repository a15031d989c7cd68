"""Datasets, the server's hold-out, federated partitions, client splits and batches."""

import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from fedlora.config import RunConfig
from fedlora.data import encoding, hashing_tokenizer, instructions, loading, partitioning
from fedlora.errors import ConfigError
from tests.support import models

ROWS, CLASSES, CLIENTS = 400, 4, 6


@pytest.fixture(scope="module")
def csv_spec(tmp_path_factory):
    """400 distinct texts, labels cycling over 4 classes, as ``csv:PATH``."""
    path = tmp_path_factory.mktemp("data") / "examples.csv"
    rows = [{"text": f"example {i} word{i % 7}", "label": i % CLASSES} for i in range(ROWS)]
    pd.DataFrame(rows).to_csv(path, index=False)
    return f"csv:{path}"


def shares(config, clients=CLIENTS):
    return [partitioning.partition(config, i, clients) for i in range(clients)]


def test_bbcnews_has_its_five_topics():
    bbc = loading.load_dataset(RunConfig())
    assert len(bbc) == 2225
    names = bbc.features["label"].names
    assert names == ["business", "entertainment", "politics", "sports", "tech"]
    counts = Counter(bbc["label"])  # the corpus' published topic sizes
    assert [counts[i] for i in range(5)] == [510, 386, 417, 511, 401]


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "shard"])
def test_partitions_are_disjoint_cover_the_federated_set_and_miss_the_server_set(
    csv_spec, partitioner
):
    config = RunConfig(dataset=csv_spec, partitioner=partitioner)
    federated, server = partitioning.federated_set(config), partitioning.server_eval_set(config)
    assert len(server) == round(0.1 * ROWS) and len(federated) == ROWS - len(server)
    texts = [text for share in shares(config) for text in share["text"]]
    assert len(texts) == len(set(texts))
    assert set(texts) == set(federated["text"])
    assert not set(texts) & set(server["text"])


def test_client_splits_divide_the_share(csv_spec):
    config = RunConfig(dataset=csv_spec, partitioner="iid", test_fraction=0.25)
    for i in range(CLIENTS):
        share, split = (
            partitioning.partition(config, i, CLIENTS),
            partitioning.client_data(config, i, CLIENTS),
        )
        assert len(split.test) == round(0.25 * len(share))
        assert sorted([*split.train["text"], *split.test["text"]]) == sorted(share["text"])


def label_skew(config):
    """Mean total-variation distance between each partition's label mix and the overall one."""
    overall = np.bincount(list(partitioning.federated_set(config)["label"]), minlength=CLASSES)
    overall = overall / overall.sum()
    distances = []
    for share in shares(config):
        mix = np.bincount(list(share["label"]), minlength=CLASSES) / len(share)
        distances.append(0.5 * np.abs(mix - overall).sum())
    return float(np.mean(distances))


def test_dirichlet_skews_the_label_mix(csv_spec):
    iid = label_skew(RunConfig(dataset=csv_spec, partitioner="iid"))
    skewed = label_skew(RunConfig(dataset=csv_spec, partitioner="dirichlet", dirichlet_alpha=0.3))
    assert iid < 0.15  # sampling noise of ~60 examples per client
    assert skewed > max(0.25, 2 * iid)


def test_same_seed_same_partitions_and_splits(csv_spec):
    def snapshot(seed):
        partitioning.clear_caches()
        config = RunConfig(dataset=csv_spec, seed=seed)
        return [
            (list(split.train["text"]), list(split.test["text"]))
            for split in (partitioning.client_data(config, i, CLIENTS) for i in range(CLIENTS))
        ]

    first = snapshot(0)
    assert snapshot(0) == first
    assert snapshot(1) != first


@pytest.mark.parametrize("spec", ["json:{}/absent.json", "{}/absent-folder"])
def test_missing_dataset_path_is_named(tmp_path, spec):
    spec = spec.format(tmp_path)
    with pytest.raises(ConfigError, match=str(tmp_path / "absent")):
        loading.load_dataset(RunConfig(dataset=spec))


def test_too_many_partitions_is_an_error(csv_spec):
    with pytest.raises(ConfigError, match="too few"):
        partitioning.partition(RunConfig(dataset=csv_spec, partitioner="iid"), 0, ROWS)


def test_string_labels_become_sorted_classes(tmp_path):
    path = tmp_path / "labels.jsonl"
    rows = [{"text": f"t{i}", "label": name} for i, name in enumerate(["sport", "art", "sport"])]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    loaded = loading.load_dataset(RunConfig(dataset=f"json:{path}"))
    assert loaded.features["label"].names == ["art", "sport"]
    assert list(loaded["label"]) == [1, 0, 1]


def test_instruction_records_keep_their_columns_for_causal_lm(tmp_path):
    path = tmp_path / "instructions.json"
    records = [{"instruction": "Add 1 and 2.", "response": "3", "extra": 0}]
    path.write_text(json.dumps(records))
    config = RunConfig(model="tiny-llama", task="causal-lm", dataset=f"json:{path}")
    loaded = loading.load_dataset(config)
    assert loaded.column_names == ["instruction", "response"]
    assert loaded[0] == {"instruction": "Add 1 and 2.", "response": "3"}


def test_batches_are_seeded_and_cover_an_epoch_before_repeating(csv_spec):
    examples = partitioning.federated_set(RunConfig(dataset=csv_spec)).select(range(40))
    tokenizer = hashing_tokenizer.HashingTokenizer(vocab_size=64)
    drawn = list(encoding.batches(examples, tokenizer, max_length=5, batch_size=8, seed=3, steps=5))
    assert len(drawn) == 5
    for batch in drawn:
        assert batch["input_ids"].shape == batch["attention_mask"].shape
        assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 5
    labels = Counter(label for batch in drawn for label in batch["labels"].tolist())
    assert labels == Counter(examples["label"])
    again = encoding.batches(examples, tokenizer, max_length=5, batch_size=8, seed=3, steps=5)
    assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(drawn, again, strict=True))


def test_causal_lm_labels_are_the_tokens_with_padding_ignored():
    tokenizer = hashing_tokenizer.HashingTokenizer(vocab_size=64)
    rows = {"text": ["one two three", "one"]}
    batch = encoding.encode(rows, tokenizer, max_length=8, task="causal-lm")
    ids = batch["input_ids"]
    assert ids[0].tolist()[0] == 1 and ids[0].tolist()[4] == 2  # BOS, 3 words, EOS
    assert ids[1].tolist()[3:] == [tokenizer.pad_token_id] * 2
    assert "attention_mask" not in batch  # padded on the right: see the next tests
    expected = ids.clone()
    expected[1, 3:] = instructions.IGNORED_LABEL
    assert (batch["labels"] == expected).all()


def test_only_a_mask_padding_on_the_right_is_dropped():
    ids = torch.arange(8).reshape(2, 4)
    right = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])}
    left = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])}
    gap = {"input_ids": ids, "attention_mask": torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])}
    assert encoding.causal_inputs(right).keys() == {"input_ids"}
    assert encoding.causal_inputs(left) is left and encoding.causal_inputs(gap) is gap


@pytest.mark.parametrize("build", [models.tiny_llama, models.tiny_gpt2], ids=["llama", "gpt2"])
def test_a_causal_lm_trains_and_measures_the_same_without_a_right_padding_mask(build):
    """What the dropped mask would have changed: nothing in the loss or any gradient (float64)."""
    model = build().double()
    tokenizer = hashing_tokenizer.HashingTokenizer(vocab_size=models.VOCAB)
    rows = {"text": ["one two three four five", "one two", "six"]}
    masked = tokenizer(
        rows["text"], truncation=True, max_length=16, padding=True, return_tensors="pt"
    )
    batch = encoding.encode(rows, tokenizer, max_length=16, task="causal-lm")
    assert (
        "attention_mask" not in batch
        and masked["attention_mask"].sum() < masked["input_ids"].numel()
    )

    def loss_and_gradients(inputs):
        model.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        return loss.detach(), [parameter.grad.clone() for parameter in model.parameters()]

    loss, gradients = loss_and_gradients(batch)
    masked_loss, masked_gradients = loss_and_gradients(
        {**batch, "attention_mask": masked["attention_mask"]}
    )
    assert torch.allclose(loss, masked_loss, rtol=1e-12, atol=0)
    for gradient, masked_gradient in zip(gradients, masked_gradients, strict=True):
        assert torch.allclose(gradient, masked_gradient, rtol=1e-10, atol=1e-14)
