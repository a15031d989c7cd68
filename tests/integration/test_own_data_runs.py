"""Runs on one's own data and model, in process (the ServerApp on a grid of ClientApps): a
``review,sentiment`` CSV with its own evaluation file, a GPT-2 folder trained on instruction
data whose columns have other names, with neither task nor target modules given, and GPT-2 and
Llama sequence classifiers whose ``score`` head is trained and exported without being named."""

import json
import math

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from clients.app import client_app
from fedlora.config import RunConfig
from fedlora.data.partitioning import clear_caches, server_eval_set
from fedlora.errors import ConfigError
from fedlora.models.base_model import load_base_model, with_lora
from simulations.run_dir import read_metrics
from strategies.evaluation import LABELS_FILE
from strategies.server_app import run
from tests.support.local_grid import LocalGrid

WORDS = ["say", "red", "green", "blue", "black", "white", ".", "<unk>", "<eos>"]


def one_round(flower_config, run_dir, nodes=2):
    clear_caches()
    grid = LocalGrid(client_app(flower_config), num_nodes=nodes)
    run(grid, {**flower_config, "run-dir": str(run_dir)})
    return read_metrics(run_dir)


def test_a_review_sentiment_csv_with_its_eval_file(tmp_path, task_identity, one_thread):
    sentiments = ["bad", "good"]
    rows = [
        {"review": f"it was {sentiments[i % 2]} {i}", "sentiment": sentiments[i % 2]}
        for i in range(40)
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
    held = [{"review": f"so {sentiments[i % 2]}", "sentiment": sentiments[i % 2]} for i in range(7)]
    pd.DataFrame(held).to_csv(tmp_path / "eval.csv", index=False)
    flower_config = {
        "strategy": "fedavg",
        "model": "tiny-bert",
        "dataset": f"csv:{tmp_path / 'train.csv'}",
        "eval-dataset": f"csv:{tmp_path / 'eval.csv'}",
        "text-column": "review",
        "label-column": "sentiment",
        "partitioner": "iid",
        "num-server-rounds": 1,
        "local-steps": 1,
        "batch-size": 4,
        "max-length": 16,
    }
    rows = one_round(flower_config, tmp_path / "run")
    assert len(rows) == 1 and 0 <= rows[0]["accuracy"] <= 1
    assert len(server_eval_set(RunConfig.from_flower(flower_config))) == 7
    labels = json.loads((tmp_path / "run" / "export" / LABELS_FILE).read_text())
    assert labels["id2label"] == {"0": "bad", "1": "good"}


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {word: i for i, word in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", bos_token="<eos>"
    )


def gpt2_folder(path):
    """A 1-layer GPT-2 of width 16 and a word-level tokenizer, saved as a model folder."""
    vocab = {word: i for i, word in enumerate(WORDS)}
    tokenizer = word_tokenizer()
    config = GPT2Config(
        vocab_size=len(WORDS),
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=32,
        bos_token_id=vocab["<eos>"],
        eos_token_id=vocab["<eos>"],
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_gpt2_folder_on_renamed_instruction_columns(tmp_path, task_identity, one_thread):
    colours = WORDS[1:6]
    rows = [{"prompt": f"say {colours[i % 5]} .", "answer": colours[i % 5]} for i in range(30)]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    flower_config = {
        "strategy": "fedex",
        "model": str(gpt2_folder(tmp_path / "gpt2")),
        "dataset": f"json:{tmp_path / 'chat.jsonl'}",
        "instruction-column": "prompt",
        "response-column": "answer",
        "partitioner": "iid",
        "num-server-rounds": 1,
        "local-steps": 2,
        "batch-size": 4,
        "max-length": 24,
        "lora-rank": 2,
        "server-eval-fraction": 0.2,
    }
    config = RunConfig.from_flower(flower_config)
    assert (config.task, config.target_module_names) == ("causal-lm", ("c_attn",))
    rows = one_round(flower_config, tmp_path / "run")
    assert len(rows) == 1 and math.isfinite(rows[0]["loss"])
    assert rows[0]["relative_deviation"] < 1e-4  # FedEx-LoRA stays exact on GPT-2's Conv1D


def classifier_folder(path, family):
    """A 1-layer sequence classifier of width 16 (GPT-2 or Llama, their head named ``score``)
    and a word-level tokenizer, saved as a model folder."""
    eos = WORDS.index("<eos>")
    if family == "gpt2":
        config = GPT2Config(
            vocab_size=len(WORDS), n_embd=16, n_layer=1, n_head=2, n_positions=32, num_labels=2
        )
        build = GPT2ForSequenceClassification
    else:
        config = LlamaConfig(
            vocab_size=len(WORDS),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=32,
            max_position_embeddings=32,
            num_labels=2,
        )
        build = LlamaForSequenceClassification
    config.bos_token_id = config.eos_token_id = config.pad_token_id = eos
    torch.manual_seed(0)
    build(config).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize(("family", "targets"), [("gpt2", ("c_attn",)), ("llama", None)])
def test_a_classifier_of_another_architecture_trains_and_exports_its_score_head(
    tmp_path, task_identity, one_thread, family, targets
):
    colours = WORDS[1:6]
    rows = [{"text": f"say {colours[i % 5]} .", "label": int(i % 5 < 2)} for i in range(24)]
    (tmp_path / "colours.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    flower_config = {
        "strategy": "fedavg",
        "model": str(classifier_folder(tmp_path / family, family)),
        "dataset": f"json:{tmp_path / 'colours.jsonl'}",
        "partitioner": "iid",
        "num-server-rounds": 1,
        "local-steps": 2,
        "batch-size": 4,
        "max-length": 8,
        "lora-rank": 2,
        "learning-rate": 0.05,
    }
    config = RunConfig.from_flower(flower_config)
    assert (config.task, config.head_module_names) == ("classification", ("score",))
    if targets:
        assert config.target_module_names == targets
    base = load_base_model(config)
    with pytest.raises(ConfigError, match="'classifier' in modules-to-save"):
        with_lora(base, 2, 8.0, False, config.target_module_names, ("classifier", "pooler"))

    rows = one_round(flower_config, tmp_path / "run")

    assert len(rows) == 1 and math.isfinite(rows[0]["loss"])
    exported = load_file(tmp_path / "run" / "export" / "adapter_model.safetensors")
    (key,) = [key for key in exported if key.endswith("score.weight")]
    initial = base.model.score.weight
    assert exported[key].shape == initial.shape
    assert not torch.allclose(exported[key], initial)
