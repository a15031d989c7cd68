"""Instruction examples as token ids, the loss on the response only.

An example has an ``instruction``, an optional ``input`` (the material it is about) and a
``response``. The user turn is the instruction, then a blank line and the input if any. With a
tokenizer that has a chat template, the prompt is the template's rendering of the user turn up to
the start of the assistant's turn, and the response part is what the template adds for the
assistant's turn (the response and its end-of-turn token). Without one (the `HashingTokenizer` of
the models built from configs, or a base model), the prompt is ``### Instruction:`` / ``###
Response:`` text and the response is followed by EOS. Prompt and response are tokenized apart, as
generation sees them, so the prompt's ids are exactly those of the prompt tokenized alone.

Labels are the input ids with every prompt position and every padding position set to -100.
When prompt and response exceed ``max_length``, the input (or, without one, the instruction) is
cut at a word boundary, keeping its beginning, so that the response is kept whole; a prompt too
long even with that text emptied is cut with the response at ``max_length``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedlora.data.columns import INPUT, INSTRUCTION, RESPONSE
from fedlora.errors import ConfigError
from fedlora.models.generation import greedy_replies

IGNORED_LABEL = -100
"""Label of a position the causal-LM loss skips, as transformers expects."""
PLAIN_PROMPT = "### Instruction:\n{user}\n\n### Response:\n"


def user_turn(instruction: str, input_text: str = "") -> str:
    """The user's message: the instruction, then a blank line and the input if there is one."""
    return f"{instruction}\n\n{input_text}" if input_text else instruction


def has_chat_template(tokenizer) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def text_ids(tokenizer, text: str) -> list[int]:
    """The ids of ``text`` without special tokens (the `HashingTokenizer`: its words' ids)."""
    if hasattr(tokenizer, "token_ids"):
        return tokenizer.token_ids(text)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_prompt(tokenizer, user: str) -> str:
    """The chat template's text of a conversation of one user turn, up to the assistant's turn."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )


def prompt_ids(tokenizer, user: str) -> list[int]:
    """The prompt's ids: the chat template's, else the plain template's after BOS."""
    if has_chat_template(tokenizer):
        return text_ids(tokenizer, chat_prompt(tokenizer, user))
    bos = getattr(tokenizer, "bos_token_id", None)
    return ([bos] if bos is not None else []) + text_ids(tokenizer, PLAIN_PROMPT.format(user=user))


def response_ids(tokenizer, user: str, response: str) -> list[int]:
    """The response part's ids: what the chat template adds for the assistant's turn, else the
    response's ids and EOS."""
    if not has_chat_template(tokenizer):
        return text_ids(tokenizer, response) + [tokenizer.eos_token_id]
    prompt = chat_prompt(tokenizer, user)
    whole = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}, {"role": "assistant", "content": response}],
        tokenize=False,
    )
    if not whole.startswith(prompt):
        raise ConfigError(
            "the tokenizer's chat template renders a user turn differently once an assistant turn "
            "follows; the prompt cannot be separated from the response"
        )
    return text_ids(tokenizer, whole[len(prompt) :])


def fitted_prompt_ids(tokenizer, instruction: str, input_text: str, budget: int) -> list[int]:
    """The prompt's ids, the input (else the instruction) cut to its first words until they are at
    most ``budget`` long (or that text is empty). Each cut keeps as many words as the current
    text's tokens per word say fit, so that a long text takes few tokenizations (on text of
    uneven tokens per word it may keep a little less than would fit)."""
    ids = prompt_ids(tokenizer, user_turn(instruction, input_text))
    if len(ids) <= budget:
        return ids

    def user(text: str) -> str:
        return user_turn(instruction, text) if input_text else text

    overhead = len(prompt_ids(tokenizer, user("")))
    words = (input_text or instruction).split(" ")
    while len(ids) > budget and words:
        tokens_per_word = max(len(ids) - overhead, 1) / len(words)
        keep = min(len(words) - 1, math.floor((budget - overhead) / tokens_per_word))
        words = words[: max(keep, 0)]
        ids = prompt_ids(tokenizer, user(" ".join(words)))
    return ids


def example_ids(
    tokenizer, instruction: str, input_text: str, response: str, max_length: int
) -> tuple[list[int], int]:
    """(ids, prompt length) of one example, at most ``max_length`` ids, the response kept whole
    when it fits."""
    answer = response_ids(tokenizer, user_turn(instruction, input_text), response)
    answer = answer[: max(0, max_length - 1)]
    prompt = fitted_prompt_ids(tokenizer, instruction, input_text, max_length - len(answer))
    ids = (prompt + answer)[:max_length]
    return ids, min(len(prompt), len(ids))


def examples_ids(
    rows: Mapping[str, Sequence], tokenizer, max_length: int
) -> list[tuple[list[int], int]]:
    """`example_ids` of each row of a batch of rows (``input`` optional)."""
    inputs = rows.get(INPUT) or [""] * len(rows[INSTRUCTION])
    return [
        example_ids(tokenizer, instruction, input_text or "", response, max_length)
        for instruction, input_text, response in zip(
            rows[INSTRUCTION], inputs, rows[RESPONSE], strict=True
        )
    ]


def collate(examples: Sequence[tuple[list[int], int]], pad_token_id: int) -> dict[str, Tensor]:
    """Examples padded on the right to the longest: ``input_ids``, ``attention_mask`` and
    ``labels`` (-100 on prompt and padding positions)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORED_LABEL, dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, prompt_length : len(ids)] = torch.tensor(ids[prompt_length:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def greedy_reply(
    model, tokenizer, instruction: str, input_text: str = "", max_new_tokens: int = 32
) -> str:
    """The model's greedy answer to one instruction, stopping at the tokenizer's EOS (the chat
    template's end of turn for chat models, which their generation configs may not stop at)."""
    prompt = prompt_ids(tokenizer, user_turn(instruction, input_text))
    return greedy_replies(model, tokenizer, [prompt], max_new_tokens, batch_size=1)[0]
