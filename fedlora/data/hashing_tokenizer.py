"""A deterministic word tokenizer without a vocabulary, for models built from configs."""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class HashingTokenizer:
    """A deterministic word tokenizer for models built from configs: lower-cased words and
    punctuation hashed (CRC-32) into ids 3..vocab_size-1, between BOS (1) and EOS (2); PAD is 0.

    Called like a transformers tokenizer with ``truncation``, ``max_length``, ``padding`` and
    ``return_tensors="pt"``; it pads on the right to the longest sequence of the batch. Hashing
    cannot be undone: `decode` writes each id as ``w{id}``.
    """

    vocab_size: int
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    def decode(self, ids: Sequence[int] | Tensor, skip_special_tokens: bool = False) -> str:
        """The ids as words ``w{id}``, joined by spaces; PAD, BOS and EOS left out if asked."""
        special = {self.pad_token_id, self.bos_token_id, self.eos_token_id}
        ids = [int(i) for i in ids]
        return " ".join(f"w{i}" for i in ids if not (skip_special_tokens and i in special))

    def token_ids(self, text: str) -> list[int]:
        first = self.eos_token_id + 1
        words = re.findall(r"\w+|[^\w\s]", text.lower())
        return [first + zlib.crc32(word.encode()) % (self.vocab_size - first) for word in words]

    def __call__(
        self,
        texts: Sequence[str],
        *,
        max_length: int,
        truncation: bool = True,
        padding: bool = True,
        return_tensors: str = "pt",
    ) -> dict[str, Tensor]:
        sequences = [
            [self.bos_token_id, *self.token_ids(text)[: max(0, max_length - 2)], self.eos_token_id][
                :max_length
            ]
            for text in texts
        ]
        width = max(len(sequence) for sequence in sequences)
        input_ids = torch.full((len(texts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(texts), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
            attention_mask[row, : len(sequence)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}
