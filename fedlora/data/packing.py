"""Sequence packing for causal-LM training on text: a client's texts tokenized whole, each ending
with EOS, joined in their order and cut into rows of ``max-length`` tokens.

Every position of a packed row is a real token with a label, so no compute goes to padding and
every batch has one shape (a compiled model keeps one graph). A row may begin in one text and end
in the next: its later positions attend to the end of the text before, as in language-model
pre-training. Instruction data is not packed (a row would mix examples' prompts and answers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

TOKENIZE_CHUNK = 256
"""Texts tokenized per call."""
WHOLE = 1 << 24
"""The tokenizer's ``max_length`` when a text is tokenized whole."""


def text_ids(texts: Sequence[str], tokenizer) -> list[list[int]]:
    """Each text's token ids, whole (special tokens as the tokenizer adds them), ending with EOS."""
    eos = tokenizer.eos_token_id
    ids = []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        chunk = list(texts[start : start + TOKENIZE_CHUNK])
        encoded = tokenizer(
            chunk, truncation=True, max_length=WHOLE, padding=True, return_tensors="pt"
        )
        for row, mask in zip(encoded["input_ids"], encoded["attention_mask"], strict=True):
            text = row[mask.bool()].tolist()
            if eos is not None and (not text or text[-1] != eos):
                text.append(eos)
            ids.append(text)
    return ids


def pack_texts(texts: Sequence[str], tokenizer, width: int) -> Tensor:
    """The texts' ids joined in order and cut into rows of ``width`` (int64, rows x width); the
    last partial row is dropped, unless it is the only one (then the one row is shorter)."""
    stream = [token for text in text_ids(texts, tokenizer) for token in text]
    rows = len(stream) // width
    if rows == 0:
        return torch.tensor(stream, dtype=torch.long).view(1, -1)
    return torch.tensor(stream[: rows * width], dtype=torch.long).view(rows, width)
