"""One's own data and model: column mapping, a separate evaluation file, the task and LoRA targets
inferred from a model folder and the data's columns."""

import json

import datasets
import pandas as pd
import pytest
from datasets.arrow_writer import ArrowWriter
from transformers import (
    BertConfig,
    DistilBertConfig,
    GPT2Config,
    LlamaConfig,
    RobertaConfig,
)

from fedlora.config import RunConfig
from fedlora.data import loading, partitioning
from fedlora.errors import ConfigError

SENTIMENTS = ["negative", "neutral", "positive"]
REVIEW_COLUMNS = {"text_column": "review", "label_column": "sentiment"}
"""The mapping of the ``reviews`` file's columns."""


@pytest.fixture(autouse=True)
def fresh_caches():
    partitioning.clear_caches()
    yield
    partitioning.clear_caches()


def write_csv(path, rows):
    pd.DataFrame(rows).to_csv(path, index=False)
    return f"csv:{path}"


@pytest.fixture
def reviews(tmp_path):
    """A ``review,sentiment`` CSV of 30 rows, the sentiments as words."""
    rows = [{"review": f"review {i}", "sentiment": SENTIMENTS[i % 3]} for i in range(30)]
    return write_csv(tmp_path / "reviews.csv", rows)


def test_a_review_sentiment_csv_loads_with_the_mapping(reviews):
    with pytest.raises(ConfigError, match=r"lacks column\(s\) \['text', 'label'\]"):
        loading.load_dataset(RunConfig(dataset=reviews))
    config = RunConfig(dataset=reviews, **REVIEW_COLUMNS)
    loaded = loading.load_dataset(config)
    assert loaded.column_names == ["text", "label"]
    assert loaded.features["label"].names == SENTIMENTS
    assert loaded["text"][:4] == ["review 0", "review 1", "review 2", "review 3"]
    assert loaded["label"][:4] == [0, 1, 2, 0]


def test_a_mapped_column_the_data_lacks_is_named(reviews):
    config = RunConfig(dataset=reviews, text_column="body", label_column="sentiment")
    with pytest.raises(ConfigError, match=r"text-column = 'body'.*\['review', 'sentiment'\]"):
        loading.load_dataset(config)


def test_a_mapped_column_replaces_one_of_fedlora_s_name_and_columns_may_swap(tmp_path):
    rows = [{"text": f"title {i}", "body": f"body {i}", "label": i % 2} for i in range(10)]
    spec = write_csv(tmp_path / "news.csv", rows)
    loaded = loading.load_dataset(RunConfig(dataset=spec, text_column="body"))
    assert loaded["text"][:2] == ["body 0", "body 1"]
    swapped = [{"text": str(i % 2), "label": f"words {i}"} for i in range(10)]
    spec = write_csv(tmp_path / "swapped.csv", swapped)
    config = RunConfig(dataset=spec, text_column="label", label_column="text")
    loaded = loading.load_dataset(config)
    assert loaded["text"][:2] == ["words 0", "words 1"] and loaded["label"][:2] == [0, 1]


def test_a_column_named_by_two_keys_and_a_mapping_of_bbcnews_are_refused():
    with pytest.raises(ConfigError, match=r"\['label'\] named by more than one"):
        RunConfig(text_column="label")
    with pytest.raises(ConfigError, match="for one's own data"):
        loading.load_dataset(RunConfig(text_column="body"))


def test_instruction_columns_map_for_causal_lm(tmp_path):
    rows = [{"prompt": f"Say {i}.", "context": "", "answer": str(i)} for i in range(8)]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    config = RunConfig(
        model="tiny-llama",
        dataset=f"json:{path}",
        instruction_column="prompt",
        input_column="context",
        response_column="answer",
    )
    assert config.task == "causal-lm"
    loaded = loading.load_dataset(config)
    assert loaded.column_names == ["instruction", "input", "response"]
    assert loaded[3] == {"instruction": "Say 3.", "input": "", "response": "3"}


def test_an_eval_file_is_the_server_s_set_and_all_the_rest_is_federated(reviews, tmp_path):
    # the evaluation file holds two of the three classes, in another order
    rows = [{"review": f"held {i}", "sentiment": ["positive", "negative"][i % 2]} for i in range(6)]
    eval_spec = write_csv(tmp_path / "eval.csv", rows)
    config = RunConfig(dataset=reviews, eval_dataset=eval_spec, **REVIEW_COLUMNS)
    assert len(partitioning.federated_set(config)) == 30
    held = partitioning.server_eval_set(config)
    assert held["text"] == [f"held {i}" for i in range(6)]
    assert held.features["label"].names == SENTIMENTS
    assert held["label"] == [2, 0, 2, 0, 2, 0]


def test_an_eval_file_with_a_class_the_training_data_lacks_is_refused(reviews, tmp_path):
    rows = [{"review": "held", "sentiment": "furious"}]
    eval_spec = write_csv(tmp_path / "eval.csv", rows)
    config = RunConfig(dataset=reviews, eval_dataset=eval_spec, **REVIEW_COLUMNS)
    with pytest.raises(ConfigError, match=r"labels \['furious'\] are not among"):
        partitioning.server_eval_set(config)


def test_integer_eval_labels_past_the_training_classes_are_refused(tmp_path):
    spec = write_csv(tmp_path / "train.csv", [{"text": f"t{i}", "label": i % 2} for i in range(8)])
    eval_spec = write_csv(tmp_path / "eval.csv", [{"text": "e", "label": 2}])
    with pytest.raises(ConfigError, match="label 2 is past the training set's 2 classes"):
        partitioning.server_eval_set(RunConfig(dataset=spec, eval_dataset=eval_spec))


def model_folder(tmp_path, config, architectures):
    folder = tmp_path / "model"
    config.architectures = architectures
    config.save_pretrained(folder)
    return str(folder)


def tiny_bert_config():
    return BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2)


def test_a_gpt2_folder_is_a_causal_lm_with_peft_s_targets(tmp_path):
    folder = model_folder(tmp_path, GPT2Config(n_embd=8, n_layer=1, n_head=2), ["GPT2LMHeadModel"])
    config = RunConfig(model=folder)
    assert config.task == "causal-lm"
    assert config.target_module_names == ("c_attn",)
    assert config.head_module_names == ()


def test_a_bert_classifier_folder_is_a_classifier_on_query_and_value(tmp_path):
    folder = model_folder(tmp_path, tiny_bert_config(), ["BertForSequenceClassification"])
    config = RunConfig(model=folder)
    assert config.task == "classification"
    assert config.target_module_names == ("query", "value")


@pytest.mark.parametrize(
    ("config", "architecture", "head"),
    [
        (GPT2Config(n_embd=8, n_layer=1, n_head=2), "GPT2ForSequenceClassification", ("score",)),
        (
            LlamaConfig(
                hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
            ),
            "LlamaForSequenceClassification",
            ("score",),
        ),
        (
            RobertaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2),
            "RobertaForSequenceClassification",
            ("classifier",),
        ),
        (
            DistilBertConfig(dim=8, n_layers=1, n_heads=2, hidden_dim=16),
            "DistilBertForSequenceClassification",
            ("pre_classifier", "classifier"),
        ),
        (tiny_bert_config(), "BertForSequenceClassification", ("classifier", "pooler")),
    ],
    ids=["gpt2", "llama", "roberta", "distilbert", "bert"],
)
def test_a_classifier_trains_the_head_of_its_architecture(tmp_path, config, architecture, head):
    folder = model_folder(tmp_path, config, [architecture])
    # peft knows no LoRA targets for DistilBERT
    targets = {"target_modules": "q_lin,v_lin"} if "DistilBert" in architecture else {}
    config = RunConfig(model=folder, **targets)
    assert config.task == "classification"
    assert config.head_module_names == head
    chosen = RunConfig(model=folder, modules_to_save="score", **targets)
    assert chosen.head_module_names == ("score",)
    assert RunConfig(model=folder, task="causal-lm", **targets).head_module_names == ()


def test_the_named_classifiers_keep_classifier_and_pooler():
    for model in ("minilm", "tiny-bert"):
        assert RunConfig(model=model).head_module_names == ("classifier", "pooler")


def test_a_model_without_a_head_takes_the_task_the_columns_allow(tmp_path, reviews):
    folder = model_folder(tmp_path, tiny_bert_config(), ["BertModel"])
    texts = write_csv(tmp_path / "texts.csv", [{"text": f"t{i}"} for i in range(4)])
    assert RunConfig(model=folder, dataset=texts).task == "causal-lm"
    with pytest.raises(ConfigError, match="fits both classification and causal LM") as refused:
        RunConfig(model=folder, dataset=reviews, **REVIEW_COLUMNS)
    assert "set task=classification or task=causal-lm" in str(refused.value)
    chosen = RunConfig(
        model=folder,
        dataset=reviews,
        **REVIEW_COLUMNS,
        task="classification",
    )
    assert chosen.head_module_names == ("classifier", "pooler")


def test_a_model_type_peft_knows_no_targets_for_is_refused_naming_the_key(tmp_path):
    folder = model_folder(tmp_path, tiny_bert_config(), ["BertForSequenceClassification"])
    config_file = tmp_path / "model" / "config.json"
    values = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**values, "model_type": "canine"}))
    with pytest.raises(ConfigError, match="target-modules: peft knows no default"):
        RunConfig(model=folder)
    assert RunConfig(model=folder, target_modules="query").target_module_names == ("query",)


def cache_hub_dataset(cache, name, rows):
    """Lay out ``rows`` as datasets' cache holds a hub dataset ``name`` once downloaded."""
    table = datasets.Dataset.from_list(rows)
    folder = cache / name / "default" / "0.0.0" / "0123456789abcdef"
    folder.mkdir(parents=True)
    with ArrowWriter(path=str(folder / f"{name}-train.arrow")) as writer:
        writer.write_table(table.data.table)
    split = datasets.SplitInfo("train", num_examples=len(rows), dataset_name=name)
    info = datasets.DatasetInfo(
        features=table.features,
        config_name="default",
        dataset_name=name,
        splits=datasets.SplitDict({"train": split}),
    )
    info.write_to_directory(str(folder))


def test_a_cached_hub_dataset_loads_by_name_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    offline = datasets.config.HF_HUB_OFFLINE
    rows = [{"review": f"review {i}", "sentiment": SENTIMENTS[i % 3]} for i in range(9)]
    cache_hub_dataset(tmp_path, "reviews", rows)
    config = RunConfig(dataset="hf:reviews", **REVIEW_COLUMNS)
    loaded = loading.load_dataset(config)
    assert loaded["text"] == [row["review"] for row in rows]
    assert loaded.features["label"].names == SENTIMENTS
    with pytest.raises(ConfigError, match="'absent' is not in the local Hugging Face"):
        loading.load_dataset(RunConfig(dataset="hf:absent"))
    assert datasets.config.HF_HUB_OFFLINE == offline


def test_clients_never_read_the_eval_file(reviews, tmp_path):
    """A device holds its share of the data, not the server's evaluation file."""
    absent = f"csv:{tmp_path / 'on-the-server-only.csv'}"
    config = RunConfig(
        dataset=reviews,
        eval_dataset=absent,
        **REVIEW_COLUMNS,
        partitioner="iid",
    )
    shares = [partitioning.client_data(config, i, 3) for i in range(3)]
    assert sum(len(share.train) + len(share.test) for share in shares) == 30
    with pytest.raises(ConfigError, match="on-the-server-only.csv does not exist"):
        partitioning.server_eval_set(config)


def test_a_json_column_named_by_the_empty_string_is_refused_by_name(tmp_path):
    data = tmp_path / "odd.json"
    data.write_text('[{"": null, "\\u0000": null}]')
    with pytest.raises(ConfigError, match=r"odd.json cannot be read as json"):
        loading.read_local(f"json:{data}")
