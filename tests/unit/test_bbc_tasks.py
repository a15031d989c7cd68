"""The instruction tasks made from BBC News: topic in one word, and the headline of the body."""

from collections import Counter

import pytest

from fedlora.config import RunConfig
from fedlora.data import loading, partitioning
from fedlora.errors import ConfigError

TOPICS = ["business", "entertainment", "politics", "sports", "tech"]


def load(name):
    return loading.load_dataset(RunConfig(model="tiny-llama", task="causal-lm", dataset=name))


@pytest.fixture(scope="module")
def news():
    return loading.bbc_news()


def test_topic_rows_ask_for_one_of_the_five_topics(news):
    topic = load("bbc-topic")
    assert topic.column_names == ["instruction", "input", "response", "label"]
    assert len(topic) == 2225 and topic.features["label"].names == TOPICS
    asked = (
        "What is the topic of this news article? Answer with one word: business, "
        "entertainment, politics, sports or tech."
    )
    assert set(topic["instruction"]) == {asked}
    assert topic["response"] == [TOPICS[label] for label in news["label"]]
    assert topic["input"] == [text.strip() for text in news["text"]]
    assert topic["label"] == news["label"]


def test_headline_rows_answer_with_the_first_line_of_the_article(news):
    headline = load("bbc-headline")
    assert headline.column_names == ["instruction", "input", "response", "label"]
    first = headline[0]
    assert first["response"] == "Ad sales boost Time Warner profit"
    assert first["input"].startswith("Quarterly profits at US media giant TimeWarner jumped 76%")
    for row, text in zip(headline, news["text"], strict=True):
        assert row["response"] and "\n" not in row["response"]
        assert text.strip() == f"{row['response']}\n\n{row['input']}"
    assert Counter(headline["label"]) == Counter(news["label"])


def test_topic_partitions_follow_the_label(news):
    config = RunConfig(
        model="tiny-llama", task="causal-lm", dataset="bbc-topic", partitioner="shard"
    )
    shares = [partitioning.partition(config, i, 5) for i in range(5)]
    assert sum(len(share) for share in shares) == len(partitioning.federated_set(config))
    assert all(len(set(share["label"])) <= 3 for share in shares)
    assert all(share["response"] == [TOPICS[label] for label in share["label"]] for share in shares)


def test_bbc_tasks_are_causal_lm_only():
    with pytest.raises(ConfigError, match="causal-lm"):
        loading.load_dataset(RunConfig(model="tiny-bert", dataset="bbc-topic"))
