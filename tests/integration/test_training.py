"""Local training and evaluation on real models: MiniLM on BBC News, tiny Llama on local JSON."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from fedlora.config import RunConfig
from fedlora.data import encoding, loading, partitioning
from fedlora.data.instructions import example_ids
from fedlora.errors import ConfigError
from fedlora.models.base_model import load_base_model, with_lora
from fedlora.models.peft_io import read_adapter, read_head
from fedlora.training.local import cpu_autocast, device_for, evaluate, train_local
from tests.support.models import torch_threads

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def tiny_bert_lora(config):
    base = load_base_model(config)
    model = with_lora(base, 4, 8.0, False, config.target_module_names, config.head_module_names)
    return base, model


@pytest.mark.slow
@torch_threads(2)
def test_minilm_lora_learns_bbc_news_on_the_cpu():
    """In the demo's precision: bf16 autocast where the CPU multiplies bf16 natively."""
    config = RunConfig(max_length=64, batch_size=16, cpu_autocast="auto")
    base = load_base_model(config)
    model = with_lora(base, 4, 8.0, False, ("query", "value"), ("classifier", "pooler"))
    train = partitioning.client_data(config, 0, 1).train
    held_out = partitioning.server_eval_set(config)
    before = evaluate(model, held_out, base.tokenizer, config, CPU, batch_size=64)
    steps = encoding.batches(train, base.tokenizer, config.max_length, 16, seed=0, steps=20)
    report = train_local(model, steps, 20, 5e-3, 0.0, CPU, seed=0, cpu_bf16=cpu_autocast(config))
    after = evaluate(model, held_out, base.tokenizer, config, CPU, batch_size=64)
    assert report.num_examples == 320 and report.seconds > 0
    assert before.num_examples == after.num_examples == len(held_out) == 222
    assert after.accuracy > max(0.75, before.accuracy + 0.3)
    assert after.loss < before.loss


def test_training_is_reproducible_and_moves_only_trainable_weights(words_spec):
    config = RunConfig(model="tiny-bert", dataset=words_spec, modules_to_save="classifier")
    train = partitioning.client_data(config, 0, 2).train
    results = []
    for _ in range(2):
        base, model = tiny_bert_lora(config)
        frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
        steps = encoding.batches(train, base.tokenizer, config.max_length, 8, seed=1, steps=4)
        report = train_local(model, steps, 4, 1e-2, 0.01, CPU, seed=2)
        assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
        assert not model.training
        results.append((report.loss, read_adapter(model), read_head(model)))
    (loss, adapter, head), (loss_again, adapter_again, head_again) = results
    assert loss == loss_again
    assert any(f.B.any() for f in adapter.values())
    assert all(torch.equal(f.B, adapter_again[n].B) for n, f in adapter.items())
    assert all(torch.equal(t, head_again[k]) for k, t in head.items())


def test_classification_evaluation_matches_one_example_at_a_time(words_spec):
    config = RunConfig(model="tiny-bert", dataset=words_spec, batch_size=7)
    base, model = tiny_bert_lora(config)
    examples = partitioning.federated_set(config).select(range(20))
    report = evaluate(model, examples, base.tokenizer, config, CPU)
    losses, hits = [], 0
    with torch.no_grad():
        for row in examples:
            inputs = base.tokenizer([row["text"]], max_length=config.max_length)
            logits = model(**inputs).logits[0]
            losses.append(-torch.log_softmax(logits, -1)[row["label"]].item())
            hits += int(logits.argmax().item() == row["label"])
    assert report.num_examples == 20
    assert report.accuracy == hits / 20
    assert math.isclose(report.loss, sum(losses) / 20, rel_tol=1e-5)


@pytest.fixture
def instructions_spec(tmp_path):
    """40 instruction records: repeat a colour word three times."""
    colours = ["red", "green", "blue", "black", "white"]
    rows = [
        {"instruction": f"Say {colours[i % 5]} three times.", "response": f"{colours[i % 5]} " * 3}
        for i in range(40)
    ]
    path = tmp_path / "instructions.json"
    path.write_text(json.dumps(rows))
    return f"json:{path}"


def causal_config(spec):
    return RunConfig(
        model="tiny-llama",
        task="causal-lm",
        dataset=spec,
        partitioner="iid",
        batch_size=8,
        modules_to_save="lm_head",
    )


def test_tiny_llama_learns_local_instructions(instructions_spec):
    config = causal_config(instructions_spec)
    base = load_base_model(config)
    model = with_lora(base, 8, 16.0, False, config.target_module_names, config.head_module_names)
    train = partitioning.client_data(config, 0, 1).train
    before = evaluate(model, train, base.tokenizer, config, CPU)
    steps = encoding.batches(train, base.tokenizer, config.max_length, 8, seed=0, steps=30)
    report = train_local(model, steps, 30, 2e-2, 0.0, CPU, seed=0)
    after = evaluate(model, train, base.tokenizer, config, CPU)
    assert math.isclose(before.loss, math.log(base.tokenizer.vocab_size), rel_tol=0.05)
    assert after.loss < 0.5 * before.loss
    assert after.accuracy > max(0.5, before.accuracy)
    assert report.loss < before.loss


def test_next_token_evaluation_matches_a_loop_over_response_positions(instructions_spec):
    config = causal_config(instructions_spec)
    base = load_base_model(config)
    examples = loading.load_dataset(config).select(range(0, 40, 7))
    report = evaluate(base.model, examples, base.tokenizer, config, CPU, batch_size=3)
    losses, hits = [], 0
    with torch.no_grad():
        for row in examples:
            ids, prompt_length = example_ids(
                base.tokenizer, row["instruction"], "", row["response"], config.max_length
            )
            ids = torch.tensor(ids)
            logits = base.model(input_ids=ids[None]).logits[0]
            for t in range(prompt_length - 1, len(ids) - 1):  # the response's tokens only
                losses.append(F.cross_entropy(logits[t], ids[t + 1]).item())
                hits += int(logits[t].argmax().item() == ids[t + 1].item())
    assert report.num_examples == len(examples)
    assert report.accuracy == hits / len(losses)
    assert math.isclose(report.loss, sum(losses) / len(losses), rel_tol=1e-5)


def test_device_for_follows_the_config():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert device_for(RunConfig()).type == expected
    assert device_for(RunConfig(device="cpu")) == CPU
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            device_for(RunConfig(device="cuda"))


def test_evaluation_batches_come_from_eval_batch_size(words_spec):
    config = RunConfig(model="tiny-bert", dataset=words_spec, batch_size=4)
    held_out = partitioning.client_data(config, 0, 2).test
    base, model = tiny_bert_lora(config)
    larger = RunConfig(model="tiny-bert", dataset=words_spec, batch_size=4, eval_batch_size=9)

    default = evaluate(model, held_out, base.tokenizer, config, CPU)
    by_key = evaluate(model, held_out, base.tokenizer, larger, CPU)

    assert config.evaluation_batch_size == 4 and larger.evaluation_batch_size == 9
    assert by_key == evaluate(model, held_out, base.tokenizer, config, CPU, batch_size=9)
    assert by_key.accuracy == default.accuracy and by_key.num_examples == default.num_examples
    assert by_key.loss == pytest.approx(default.loss, rel=1e-6)
    with pytest.raises(ConfigError, match="eval-batch-size"):
        RunConfig.from_flower({"eval-batch-size": -1})
