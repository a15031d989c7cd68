"""Training options: gradient accumulation, activation checkpointing, the learning-rate schedule."""

import copy

import datasets
import pytest
import torch

from fedlora.config import RunConfig
from fedlora.data.instructions import collate
from fedlora.errors import ConfigError
from fedlora.models.base_model import load_base_model, with_lora
from fedlora.training.local import (
    enable_activation_checkpointing,
    learning_rates,
    loss_targets,
    train_local,
    train_round,
)
from fedlora.training.lr_schedule import round_learning_rates
from tests.support.models import FAMILIES, tiny_llama, torch_threads
from tests.support.models import with_lora as lora_copy

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def lora_llama():
    """A float64 LoRA tiny Llama whose B factors are random (so every factor gets a gradient)."""
    model = lora_copy(tiny_llama(), FAMILIES["llama"], rank=4).double()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


def token_examples(count, seed=0):
    """(ids, prompt length) pairs of varied lengths and prompt lengths."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(count):
        length = 6 + (5 * i) % 17
        ids = torch.randint(3, 100, (length,), generator=generator).tolist()
        examples.append((ids, 2 + i % 4))
    return examples


def trained(model, batches, accumulation_steps):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    report = train_local(
        model, batches, 1, 0.5, 0.0, CPU, optimizer=optimizer, accumulation_steps=accumulation_steps
    )
    return report, {name: p.detach().clone() for name, p in model.named_parameters()}


def test_two_accumulated_batches_of_four_make_the_step_of_one_batch_of_eight():
    examples = token_examples(8)
    whole = collate(examples, 0)
    halves = [collate(examples[:4], 0), collate(examples[4:], 0)]
    assert loss_targets(halves[0]) != loss_targets(halves[1])  # unequal weights matter
    assert halves[1]["input_ids"].shape[1] < whole["input_ids"].shape[1]  # less padding
    model = lora_llama()
    one, after_one = trained(copy.deepcopy(model), [whole], 1)
    two, after_two = trained(copy.deepcopy(model), halves, 2)
    assert one.num_examples == two.num_examples == 8
    assert two.loss == pytest.approx(one.loss, rel=1e-6)  # reported in float32
    moved = 0
    for name, weight in after_one.items():
        torch.testing.assert_close(after_two[name], weight, rtol=0, atol=1e-12)
        moved += int(not torch.equal(weight, dict(model.named_parameters())[name]))
    assert moved > 0


def test_activation_checkpointing_gives_the_same_gradients():
    model = lora_llama()
    checkpointed = copy.deepcopy(model)
    enable_activation_checkpointing(checkpointed)
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())
    batch = collate(token_examples(4), 0)
    for each in (model, checkpointed):
        each.train()
        each(**batch).loss.backward()
    for (name, plain), (_, saved) in zip(
        model.named_parameters(), checkpointed.named_parameters(), strict=True
    ):
        if plain.requires_grad:
            torch.testing.assert_close(saved.grad, plain.grad, rtol=0, atol=1e-12, msg=name)


def test_a_round_with_checkpointing_and_accumulation_trains_as_configured():
    rows = {
        "instruction": [f"Say {word} twice." for word in ("red", "blue", "green") * 8],
        "response": [f"{word} {word}" for word in ("red", "blue", "green") * 8],
    }
    examples = datasets.Dataset.from_dict(rows)
    settings = {"model": "tiny-llama", "task": "causal-lm", "batch_size": 4, "local_steps": 2}
    base = load_base_model(RunConfig(**settings))
    results = []
    for checkpointing in (False, True):
        config = RunConfig(
            **settings, gradient_accumulation_steps=3, gradient_checkpointing=checkpointing
        )
        model = with_lora(base, 4, 8.0, False, config.target_module_names, ())
        report = train_round(model, examples, base.tokenizer, config, CPU, seed=5)
        assert report.num_examples == 2 * 3 * 4
        results.append((report.loss, [p.detach().clone() for p in model.parameters()]))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    for plain, saved in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(saved, plain, rtol=1e-5, atol=1e-6)


def test_linear_schedule_warms_up_then_decays_over_the_run():
    # 3 rounds x 2 local steps, 2 warm-up steps: multipliers 1/2, 1 | 4/4, 3/4 | 2/4, 1/4
    rates = [rate for r in (1, 2, 3) for rate in round_learning_rates(0.4, r, 2, 3, 2, "linear")]
    assert rates == pytest.approx([0.2, 0.4, 0.4, 0.3, 0.2, 0.1])
    constant = [
        rate for r in (1, 2, 3) for rate in round_learning_rates(0.4, r, 2, 3, 2, "constant")
    ]
    assert constant == pytest.approx([0.2, 0.4, 0.4, 0.4, 0.4, 0.4])
    assert round_learning_rates(0.4, 1, 3, 2, 0, "linear") == pytest.approx(
        [0.4, 0.4 * 5 / 6, 0.4 * 4 / 6]
    )


def test_the_default_schedule_keeps_the_learning_rate():
    config = RunConfig()
    assert (config.lr_schedule, config.warmup_steps, config.gradient_accumulation_steps) == (
        "constant",
        0,
        1,
    )
    assert learning_rates(config, 4) == [config.learning_rate] * config.local_steps


def test_steps_take_the_scheduled_rates():
    model = lora_llama()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    batch = collate(token_examples(4), 0)
    train_local(model, [batch, batch], 2, 1.0, 0.0, CPU, optimizer=optimizer, learning_rates=[0, 0])
    assert all(torch.equal(p, start[name]) for name, p in model.named_parameters())
    train_local(model, [batch], 1, 1.0, 0.0, CPU, optimizer=optimizer, learning_rates=[0.25])
    assert optimizer.param_groups[0]["lr"] == 0.25


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"gradient_accumulation_steps": 0}, "gradient-accumulation-steps must be >= 1"),
        ({"lr_schedule": "cosine"}, "lr-schedule"),
        ({"warmup_steps": -1}, "warmup-steps must be >= 0"),
        ({"warmup_steps": 16, "num_server_rounds": 5, "local_steps": 3}, "exceeds the run's 15"),
        ({"gradient_accumulation_steps": 2, "dp_sample": True}, "dp-sample"),
    ],
)
def test_bad_training_options_are_named(settings, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**settings)


def test_training_options_parse_from_flower_keys():
    config = RunConfig.from_flower(
        {
            "gradient-accumulation-steps": 4,
            "gradient-checkpointing": True,
            "lr-schedule": "linear",
            "warmup-steps": 3,
        }
    )
    assert config.gradient_accumulation_steps == 4 and config.gradient_checkpointing
    assert (config.lr_schedule, config.warmup_steps) == ("linear", 3)
