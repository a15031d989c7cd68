"""Logits only where the loss reads them: the same loss and gradients, fewer positions."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedlora.data.instructions import IGNORED_LABEL
from fedlora.models.base_model import BaseModel
from fedlora.models.grouped_lora import group_of_peft_models, peft_factors
from fedlora.training.grouped import train_group
from fedlora.training.local import train_local
from fedlora.training.logits_window import KEEP_KEY, keeps_logits, labelled_window
from tests.support.models import FAMILIES, VOCAB, tiny_bert, tiny_llama, with_lora
from tests.unit.test_grouped_training import LR, STEPS, WEIGHT_DECAY, lora_client

WIDTH = 12


def instruction_batch(seed: int, prompts=(7, 5, 9), lengths=(12, 10, 12)) -> dict:
    """Right-padded rows labelled after their prompt only, as `fedlora.data.instructions`
    collates them."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (len(prompts), WIDTH), generator=generator)
    columns = torch.arange(WIDTH)
    mask = (columns < torch.tensor(lengths)[:, None]).long()
    labels = input_ids.masked_fill(columns < torch.tensor(prompts)[:, None], IGNORED_LABEL)
    labels = labels.masked_fill(mask == 0, IGNORED_LABEL)
    return {"input_ids": input_ids * mask, "attention_mask": mask, "labels": labels}


def test_the_window_starts_one_position_before_the_first_label():
    model = with_lora(tiny_llama(), FAMILIES["llama"], rank=4)
    batch = instruction_batch(0)

    windowed = labelled_window(model, batch)

    assert windowed[KEEP_KEY] == WIDTH - 5 + 1  # the second row's response starts at column 5
    assert torch.equal(windowed["labels"], batch["labels"][:, 4:])
    assert torch.equal(windowed["input_ids"], batch["input_ids"])
    logits = model(**{k: v for k, v in windowed.items() if k != "labels"}).logits
    assert logits.shape[1] == windowed[KEEP_KEY]


def test_loss_and_gradients_equal_those_over_every_position(one_thread):
    model = with_lora(tiny_llama(), FAMILIES["llama"], rank=4)
    batch = instruction_batch(1)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_and_gradients(inputs):
        model.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trainable]

    full_loss, full_grads = loss_and_gradients(batch)
    loss, grads = loss_and_gradients(labelled_window(model, batch))

    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=0)  # float32 cross-entropy
    for grad, full in zip(grads, full_grads, strict=True):
        torch.testing.assert_close(grad, full, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize(
    ("model", "batch"),
    [
        (tiny_bert(), {"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.ones(2)}),
        (tiny_llama(), {"input_ids": torch.ones(2, 4, dtype=torch.long)}),
        (tiny_llama(), {"labels": torch.ones(2, 4, dtype=torch.long)}),  # text: labelled from 0
        (tiny_llama(), {"labels": torch.full((2, 4), IGNORED_LABEL)}),  # nothing labelled
        (nn.Linear(2, 2), instruction_batch(0)),  # no transformers model inside
    ],
    ids=["class labels", "no labels", "text", "nothing labelled", "not transformers"],
)
def test_a_batch_with_nothing_to_cut_is_left_as_it_is(model, batch):
    assert labelled_window(model, batch) is batch


def test_models_that_take_logits_to_keep():
    assert keeps_logits(with_lora(tiny_llama(), FAMILIES["llama"], rank=2))
    assert not keeps_logits(tiny_bert())


def test_grouped_clients_on_instructions_train_as_alone(one_thread):
    base = BaseModel(model=tiny_llama(), tokenizer=None, num_labels=0)
    setup = ((2, 31), (8, 32))
    clients = [lora_client(base, rank, seed) for rank, seed in setup]
    data = [[instruction_batch(seed + step) for step in range(STEPS)] for _, seed in setup]
    group = group_of_peft_models(copy.deepcopy(base.model), clients)

    train_group(group, data, STEPS, LR, WEIGHT_DECAY, "cpu", seed=0)
    for client, (model, batches) in enumerate(zip(clients, data, strict=True)):
        train_local(model, batches, STEPS, LR, WEIGHT_DECAY, "cpu", seed=setup[client][1])
        grouped = group.client_factors(client)
        for name, (A, B) in peft_factors(model).items():
            torch.testing.assert_close(grouped[name][0], A, rtol=0, atol=1e-10)
            torch.testing.assert_close(grouped[name][1], B, rtol=0, atol=1e-10)
