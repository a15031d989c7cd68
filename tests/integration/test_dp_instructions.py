"""DP-SGD (Opacus) on the LLM path with instruction data: a sequence is the privacy unit and its
loss covers its response tokens only."""

import json

import pytest
import torch
from torch import nn

from clients.app import client_app
from fedlora.config import RunConfig
from fedlora.data import encoding, partitioning
from fedlora.data.instructions import IGNORED_LABEL
from fedlora.models.base_model import load_base_model, with_lora
from fedlora.privacy.sample_level import ExampleLoss, client_plan, example_loader
from fedlora.training.local import train_local, train_private
from strategies.server_app import run
from tests.support.local_grid import LocalGrid

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = ["red", "green", "blue", "black", "white"]


@pytest.fixture
def instructions_spec(tmp_path):
    rows = [
        {"instruction": f"Say {COLOURS[i % 5]}" + " please" * (i % 3), "response": COLOURS[i % 5]}
        for i in range(40)
    ]
    path = tmp_path / "instructions.json"
    path.write_text(json.dumps(rows))
    return f"json:{path}"


def dp_config(spec: str, **fields) -> RunConfig:
    defaults = {"max_length": 16, "batch_size": 8, "local_steps": 2, "learning_rate": 0.01}
    return RunConfig(
        model="tiny-llama",
        task="causal-lm",
        dataset=spec,
        partitioner="iid",
        lora_rank=4,
        dp_sample=True,
        **{**defaults, **fields},
    )


def test_private_batches_label_the_responses_only(instructions_spec):
    config = dp_config(instructions_spec)
    base = load_base_model(config)
    train = partitioning.client_data(config, 0, 2).train
    batch = next(iter(example_loader(train, base.tokenizer, config, seed=0)))
    assert "attention_mask" not in batch  # padded on the right (`encoding.causal_inputs`)
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        (labelled,) = torch.nonzero(labels != IGNORED_LABEL, as_tuple=True)
        # the response's word and EOS: the last two real tokens, nothing of the prompt
        assert labelled.tolist() == [labelled[0], labelled[0] + 1]
        assert labels[labelled].tolist() == ids[labelled].tolist()
        assert (ids[labelled[-1] + 1 :] == base.tokenizer.pad_token_id).all()


def test_noise_free_unclipped_dp_sgd_equals_plain_training_on_the_response_loss(
    instructions_spec,
):
    """Noise 0, no clipping, no Poisson sampling, batch = all n sequences: Opacus' per-sequence
    gradients summed over n are the gradient of the mean per-sequence response loss, so three
    AdamW steps agree with plain training on that loss to 1e-9 in float64."""
    n = 14
    config = dp_config(
        instructions_spec,
        batch_size=n,
        local_steps=3,
        dp_noise_multiplier=0.0,
        dp_max_grad_norm=1e6,
        dp_poisson_sampling=False,
    )
    train = partitioning.client_data(config, 0, 2).train.select(range(n))
    plan = client_plan(config, n)
    per_sequence = ExampleLoss("causal-lm")
    runs = []
    for private in (False, True):
        base = load_base_model(config)
        model = with_lora(base, 4, 8.0, False, config.target_module_names, ()).double()
        if private:
            _, history = train_private(model, train, base.tokenizer, config, plan, [], "cpu", 0)
            assert history == [(0.0, 1.0, 3)]
        else:
            every = encoding.encode(train[:], base.tokenizer, config.max_length, config.task)

            def loss_fn(model: nn.Module, batch) -> torch.Tensor:
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                return per_sequence(model(**inputs).logits, batch["labels"])

            train_local(model, [every] * 3, 3, config.learning_rate, 0.0, "cpu", loss_fn=loss_fn)
        runs.append({k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad})
    plain, private = runs
    for name in plain:
        torch.testing.assert_close(private[name], plain[name], rtol=0, atol=1e-9)
    assert any((t != 0).any() for name, t in plain.items() if "lora_B" in name)


def test_a_private_federation_on_instruction_data_spends_epsilon(
    instructions_spec, tmp_path, task_identity
):
    config = {
        "strategy": "fedavg",
        "model": "tiny-llama",
        "task": "causal-lm",
        "dataset": instructions_spec,
        "partitioner": "iid",
        "num-server-rounds": 1,
        "max-length": 16,
        "batch-size": 8,
        "local-steps": 2,
        "dp-sample": True,
        "dp-noise-multiplier": 1.0,
        "generation-every": 1,
        "max-new-tokens": 2,
    }
    run(LocalGrid(client_app(config), num_nodes=2), {**config, "run-dir": str(tmp_path)})
    (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert row["clients"] == 2 and row["epsilon_max"] > 0
    assert row["train_loss"] > 0 and 0 <= row["answer_accuracy"] <= 1
