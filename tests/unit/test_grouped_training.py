"""Grouped training: four clients trained in one forward/backward end where each ends alone."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from fedlora.config import RunConfig
from fedlora.models.base_model import BaseModel, with_lora
from fedlora.models.grouped_lora import (
    GroupedLoRA,
    GroupedLoRALinear,
    batched,
    group_of_peft_models,
    peft_factors,
)
from fedlora.models.peft_io import lora_layers, read_head
from fedlora.training.grouped import stack_batches, train_group, train_jobs_together
from fedlora.training.local import train_local
from fedlora.training.rendezvous import TrainingJob
from tests.support.models import VOCAB, tiny_bert, tiny_llama

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# (rank, batch size, sequence length, seed) of each client: mixed ranks, widths and data order
CLIENTS = ((2, 3, 9, 11), (8, 2, 16, 12), (4, 4, 5, 13), (8, 1, 12, 14))
# the same with equal batch sizes: the layers' batched products over zero-padded factors
EQUAL_ROWS = ((2, 3, 9, 21), (8, 3, 16, 22), (4, 3, 5, 23), (8, 3, 12, 24))
STEPS, LR, WEIGHT_DECAY = 3, 0.05, 0.01


def client_batches(batch_size: int, length: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``STEPS`` seeded causal-LM batches, right-padded: some rows shorter than ``length``."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(STEPS):
        input_ids = torch.randint(3, VOCAB, (batch_size, length), generator=generator)
        lengths = torch.randint(length // 2, length + 1, (batch_size,), generator=generator)
        mask = (torch.arange(length) < lengths[:, None]).long()
        input_ids = input_ids * mask
        labels = input_ids.masked_fill(mask == 0, -100)
        batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return batches


def lora_client(base: BaseModel, rank: int, seed: int):
    """A peft client of ``rank`` whose B starts random (so that A trains from the first step)."""
    model = with_lora(base, rank, 2.0 * rank, False, TARGETS, (), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, B in peft_factors(model).values():
            B.copy_(torch.randn(B.shape, generator=generator, dtype=B.dtype) * 0.1)
    return model


@pytest.mark.parametrize(
    ("setup", "batched_path"), [(CLIENTS, False), (EQUAL_ROWS, True)], ids=["per-client", "batched"]
)
def test_each_client_of_a_group_trains_as_it_would_alone(setup, batched_path, one_thread):
    base = BaseModel(model=tiny_llama(), tokenizer=None, num_labels=0)
    clients = [lora_client(base, rank, seed) for rank, _, _, seed in setup]
    data = [client_batches(size, length, seed) for _, size, length, seed in setup]
    group = group_of_peft_models(copy.deepcopy(base.model), clients)
    for step in range(STEPS):
        rows, _ = stack_batches([batches[step] for batches in data])
        assert batched(rows) is batched_path

    reports = train_group(group, data, STEPS, LR, WEIGHT_DECAY, "cpu", seed=0)
    for client, (model, batches) in enumerate(zip(clients, data, strict=True)):
        alone = train_local(model, batches, STEPS, LR, WEIGHT_DECAY, "cpu", seed=setup[client][3])
        # the loss is float32 (the causal-LM loss casts the logits) and the group's padded rows
        # sum it in another order: equal to float32's rounding, the factors to 1e-10
        assert reports[client].loss == pytest.approx(alone.loss, rel=1e-6)
        grouped = group.client_factors(client)
        for name, (A, B) in peft_factors(model).items():
            start_A = lora_client(base, setup[client][0], setup[client][3])
            assert not torch.equal(A, peft_factors(start_A)[name][0])  # it did train
            torch.testing.assert_close(grouped[name][0], A, rtol=0, atol=1e-10)
            torch.testing.assert_close(grouped[name][1], B, rtol=0, atol=1e-10)


def jobs_of(clients, data, setup, rates=None):
    config = RunConfig(learning_rate=LR, weight_decay=WEIGHT_DECAY)
    return [
        TrainingJob(model, batches, STEPS, rates or [LR] * STEPS, seed, config, alone=None)
        for model, batches, (*_, seed) in zip(clients, data, setup, strict=True)
    ]


def factors_of(models):
    return [{n: (A.clone(), B.clone()) for n, (A, B) in peft_factors(m).items()} for m in models]


def assert_untrained(models, before):
    for model, factors in zip(models, before, strict=True):
        for name, (A, B) in peft_factors(model).items():
            assert torch.equal(A, factors[name][0]) and torch.equal(B, factors[name][1])


@pytest.mark.parametrize("frozen_A", [False, True], ids=["lora", "ffa-lora"])
def test_jobs_trained_together_are_written_back_as_trained_alone(frozen_A, one_thread):
    """`train_jobs_together`, as the in-process engine's groups call it: each peft model ends with
    the factors it reaches alone; clients whose A is frozen (FFA-LoRA's) keep it exactly."""
    base = BaseModel(model=tiny_llama(), tokenizer=None, num_labels=0)
    setup = EQUAL_ROWS[:3]
    clients = [lora_client(base, rank, seed) for rank, _, _, seed in setup]
    for model in clients:
        for layer in lora_layers(model).values():
            layer.lora_A["default"].weight.requires_grad_(not frozen_A)
    twins = [copy.deepcopy(model) for model in clients]
    data = [client_batches(size, length, seed) for _, size, length, seed in setup]
    before = factors_of(clients)

    reports = train_jobs_together(jobs_of(clients, data, setup))
    for client, (model, twin) in enumerate(zip(clients, twins, strict=True)):
        alone = train_local(
            twin, data[client], STEPS, LR, WEIGHT_DECAY, "cpu", seed=setup[client][3]
        )
        assert reports[client].loss == pytest.approx(alone.loss, rel=1e-6)
        expected = peft_factors(twin)
        for name, (A, B) in peft_factors(model).items():
            torch.testing.assert_close(A, expected[name][0], rtol=0, atol=1e-10)
            torch.testing.assert_close(B, expected[name][1], rtol=0, atol=1e-10)
            assert torch.equal(A, before[client][name][0]) is frozen_A


def test_jobs_that_cannot_train_together_are_refused_before_anything_trains(one_thread):
    """Different frozen bases, different learning rates, or a factor frozen by some clients and
    trained by others: a ValueError naming it, every model untouched."""
    base = BaseModel(model=tiny_llama(), tokenizer=None, num_labels=0)
    setup = EQUAL_ROWS[:3]
    clients = [lora_client(base, rank, seed) for rank, _, _, seed in setup]
    data = [client_batches(size, length, seed) for _, size, length, seed in setup]
    before = factors_of(clients)

    jobs = jobs_of(clients, data, setup)
    jobs[1] = jobs_of(clients[1:2], data[1:2], setup[1:2], rates=[LR / 2] * STEPS)[0]
    with pytest.raises(ValueError, match="learning rates differ"):
        train_jobs_together(jobs)
    for layer in lora_layers(clients[1]).values():
        layer.lora_A["default"].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="others keep frozen"):
        train_jobs_together(jobs_of(clients, data, setup))
    with torch.no_grad():
        next(iter(lora_layers(clients[2]).values())).get_base_layer().weight.add_(1.0)
    with pytest.raises(ValueError, match="frozen bases differ"):
        train_jobs_together(jobs_of(clients, data, setup))
    assert_untrained(clients, before)


def test_clients_with_their_own_heads_train_as_alone(one_thread):
    """Classification with peft's modules_to_save (pooler and classifier): one head copy per
    client on its rows; dropout off."""
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertForSequenceClassification(config).double()
    base = BaseModel(model=model, tokenizer=None, num_labels=3)
    clients = [
        with_lora(
            base, rank, 2.0 * rank, False, ("query", "value"), ("classifier", "pooler"), seed=seed
        )
        for rank, seed in ((2, 1), (4, 2), (2, 3))
    ]
    data = []
    for size, length, seed in ((3, 7, 1), (2, 11, 2), (4, 5, 3)):
        generator = torch.Generator().manual_seed(seed)
        mask = torch.ones(size, length, dtype=torch.long)
        mask[0, length - 2 :] = 0  # a padded row
        data.append(
            [
                {
                    "input_ids": torch.randint(3, VOCAB, (size, length), generator=generator)
                    * mask,
                    "attention_mask": mask,
                    "labels": torch.randint(0, 3, (size,), generator=generator),
                }
                for _ in range(STEPS)
            ]
        )
    group = group_of_peft_models(copy.deepcopy(base.model), clients)
    assert set(group.heads) == {"base_model.model.classifier", "base_model.model.bert.pooler"}
    train_group(group, data, STEPS, LR, WEIGHT_DECAY, "cpu")
    for client, (model, batches) in enumerate(zip(clients, data, strict=True)):
        train_local(model, batches, STEPS, LR, WEIGHT_DECAY, "cpu")
        trained_head = read_head(model)
        assert trained_head.keys() == group.client_head_parameters(client).keys()
        for key, parameter in group.client_head_parameters(client).items():
            torch.testing.assert_close(parameter.detach(), trained_head[key], rtol=0, atol=1e-10)
        for name, (A, B) in peft_factors(model).items():
            torch.testing.assert_close(group.client_factors(client)[name][1], B, rtol=0, atol=1e-10)
            torch.testing.assert_close(group.client_factors(client)[name][0], A, rtol=0, atol=1e-10)


def test_the_batched_products_equal_the_per_client_ones_with_their_gradients():
    """One layer, clients of ranks 1, 3, 2 on 2 rows each: the same terms and factor gradients,
    and zero gradients on the padding of the stacked factors."""
    generator = torch.Generator().manual_seed(0)
    layer = GroupedLoRALinear(torch.nn.Linear(5, 7).double(), [1, 3, 2], [2.0, 0.5, 1.0])
    with torch.no_grad():
        for client in range(3):
            for factor in (layer.client_A(client), layer.client_B(client)):
                factor.copy_(torch.randn(factor.shape, generator=generator, dtype=factor.dtype))
    x = torch.randn(6, 4, 5, generator=generator, dtype=torch.float64)
    layer.rows = [2, 2, 2]
    results = []
    for terms in (layer.batched_terms, layer.client_terms):
        term = terms(x)
        gradients = torch.autograd.grad(term.square().sum(), [layer.lora_A, layer.lora_B])
        results.append((term, gradients))
    (batched_term, batched_gradients), (client_term, client_gradients) = results
    assert batched_term.shape == (6, 4, 7)
    torch.testing.assert_close(batched_term, client_term, rtol=0, atol=1e-12)
    for batched_gradient, client_gradient in zip(batched_gradients, client_gradients, strict=True):
        torch.testing.assert_close(batched_gradient, client_gradient, rtol=0, atol=1e-12)
    A_gradient, B_gradient = batched_gradients
    assert not A_gradient[0, 1:].any() and not B_gradient[2, :, 2:].any()


def test_a_client_alone_in_the_group_is_a_plain_lora_forward(one_thread):
    base = BaseModel(model=tiny_llama(), tokenizer=None, num_labels=0)
    model = lora_client(base, 4, 5)
    group = group_of_peft_models(copy.deepcopy(base.model), [model])
    batch = client_batches(3, 10, 5)[0]
    labels = batch.pop("labels")
    torch.testing.assert_close(
        group([3], **batch).logits, model(**batch).logits, rtol=0, atol=1e-12
    )
    assert labels.shape == (3, 10)


def test_stacking_pads_on_the_right_with_masked_ignored_positions():
    short = {
        "input_ids": torch.ones(1, 2, dtype=torch.long),
        "attention_mask": torch.ones(1, 2),
        "labels": torch.ones(1, 2, dtype=torch.long),
    }
    wide = {key: torch.ones(2, 4, dtype=tensor.dtype) for key, tensor in short.items()}
    rows, stacked = stack_batches([short, wide])
    assert rows == [1, 2]
    assert stacked["attention_mask"].tolist()[0] == [1, 1, 0, 0]
    assert stacked["labels"].tolist()[0] == [1, 1, -100, -100]
    assert stacked["input_ids"].shape == (3, 4)


def test_a_group_refuses_factors_that_do_not_fit():
    group = GroupedLoRA(tiny_llama(), [2, 4], [1.0, 1.0], TARGETS)
    factors = group.client_factors(1)
    with pytest.raises(ValueError, match="shapes"):
        group.load_client(0, factors)
    with pytest.raises(ValueError, match="missing"):
        group.load_client(0, dict(list(factors.items())[1:]))
    with pytest.raises(ValueError, match="no linear layer"):
        GroupedLoRA(tiny_bert(), [2], [1.0], TARGETS)
