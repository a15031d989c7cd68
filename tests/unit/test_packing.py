"""Sequence packing (`pack-sequences`): a client's texts joined, each ending with EOS, and cut
into rows of max-length tokens, every position labelled; refused where it does not apply."""

import datasets
import numpy as np
import pytest

from fedlora.config import RunConfig
from fedlora.data import encoding, packing
from fedlora.data.hashing_tokenizer import HashingTokenizer
from fedlora.errors import ConfigError

TEXTS = [f"text {i} " + "word " * (3 + 5 * i % 11) for i in range(20)]


class CountingTokenizer(HashingTokenizer):
    calls = 0

    def __call__(self, texts, **options):
        object.__setattr__(self, "calls", self.calls + 1)
        return super().__call__(texts, **options)


def whole(tokenizer, text):
    """A text as the hashing tokenizer writes it whole: BOS, its words, EOS."""
    return [tokenizer.bos_token_id, *tokenizer.token_ids(text), tokenizer.eos_token_id]


def test_rows_are_the_texts_joined_in_order_and_cut_to_the_width():
    tokenizer = HashingTokenizer(vocab_size=64)
    stream = [token for text in TEXTS for token in whole(tokenizer, text)]
    rows = packing.pack_texts(TEXTS, tokenizer, width=16)

    assert rows.shape == (len(stream) // 16, 16)
    assert rows.flatten().tolist() == stream[: rows.numel()]  # the partial last row dropped
    short = packing.pack_texts(TEXTS[:1], tokenizer, width=512)  # less than one row of text
    assert short.tolist() == [whole(tokenizer, TEXTS[0])]


def test_a_tokenizer_that_adds_no_eos_gets_one_after_each_text():
    class BosOnly(HashingTokenizer):
        def __call__(self, texts, **options):
            encoded = super().__call__(texts, **options)
            ids, mask = encoded["input_ids"], encoded["attention_mask"]
            mask[ids == self.eos_token_id] = 0  # drop the EOS the hashing tokenizer adds
            ids[ids == self.eos_token_id] = self.pad_token_id
            return {"input_ids": ids, "attention_mask": mask}

    tokenizer = BosOnly(vocab_size=64)
    assert packing.text_ids(TEXTS[:2], tokenizer) == [whole(tokenizer, t) for t in TEXTS[:2]]


def test_packed_batches_are_full_rows_labelled_everywhere_seeded_and_cover_an_epoch():
    data = datasets.Dataset.from_dict({"text": TEXTS})
    tokenizer = CountingTokenizer(vocab_size=64)
    rows = encoding.packed_rows(data, tokenizer, 16)
    drawn = list(encoding.batches(data, tokenizer, 16, 4, seed=3, steps=6, pack=True))
    calls = tokenizer.calls

    for batch in drawn:
        assert batch.keys() == {"input_ids", "labels"}  # no padding, hence no mask
        assert batch["input_ids"].shape == (4, 16) and batch["labels"].equal(batch["input_ids"])
    epoch = np.concatenate([b["input_ids"] for b in drawn])[: len(rows)]
    assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, rows.tolist()))
    again = list(encoding.batches(data, tokenizer, 16, 4, seed=3, steps=6, pack=True))
    assert all(a["input_ids"].equal(b["input_ids"]) for a, b in zip(drawn, again, strict=True))
    assert tokenizer.calls == calls == 1  # tokenized once, in one call of 20 texts
    other = list(encoding.batches(data, tokenizer, 16, 4, seed=4, steps=6, pack=True))
    assert any(not a["input_ids"].equal(b["input_ids"]) for a, b in zip(drawn, other, strict=True))


def test_packing_is_refused_where_it_does_not_apply():
    tokenizer = HashingTokenizer(vocab_size=64)
    labelled = datasets.Dataset.from_dict({"text": TEXTS, "label": [0, 1] * 10})
    with pytest.raises(ConfigError, match="not task 'classification'"):
        next(encoding.batches(labelled, tokenizer, 16, 4, seed=0, steps=1, pack=True))
    instructions = datasets.Dataset.from_dict({"instruction": TEXTS, "response": TEXTS})
    with pytest.raises(ConfigError, match="not instruction data"):
        next(encoding.batches(instructions, tokenizer, 16, 4, seed=0, steps=1, pack=True))
    with pytest.raises(ConfigError, match="pack-sequences packs causal-LM text, not task"):
        RunConfig(pack_sequences=True)
    with pytest.raises(ConfigError, match="not supported with dp-sample"):
        RunConfig(model="tiny-llama", task="causal-lm", pack_sequences=True, dp_sample=True)
