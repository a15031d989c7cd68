"""Evaluation by generation on a held-out set of instructions (the server's, or a client's with
``client-generation``): a model's greedy answers scored against the references
(`fedlora.models.generation`), in rounds k, 2k, ... of ``generation-every`` = k and after the last."""

from __future__ import annotations

from dataclasses import dataclass

import datasets

from fedlora.config import RunConfig, every_k_rounds
from fedlora.data.columns import INPUT, INSTRUCTION, RESPONSE
from fedlora.data.encoding import is_instruction_data
from fedlora.data.instructions import example_ids, user_turn
from fedlora.errors import ConfigError
from fedlora.models.generation import METRIC_COLUMNS, generation_metric, greedy_replies, score


def generation_due(config: RunConfig, server_round: int) -> bool:
    """Rounds k, 2k, ... of ``generation-every`` = k, and the last round; never with k = 0."""
    every = config.generation_every
    return every > 0 and every_k_rounds(server_round, every, config.num_server_rounds)


@dataclass(frozen=True)
class GenerationReport:
    """The score's column and value, and one sample per example: prompt (the user turn before any
    cut to ``max-length``), reference and generation."""

    column: str
    value: float
    samples: list[dict[str, str]]


class GenerationEvaluation:
    """Greedy generation on the held-out instructions, each prompt cut as training cuts it."""

    def __init__(self, config: RunConfig, data: datasets.Dataset, tokenizer) -> None:
        if config.generation_every and not is_instruction_data(data, config.task):
            raise ConfigError(
                "generation-every needs instruction data (task causal-lm with an instruction "
                "column)"
            )
        self.config, self.tokenizer = config, tokenizer
        self.metric = generation_metric(config.generation_metric, config.dataset)
        self.column = METRIC_COLUMNS[self.metric]
        if not config.generation_every:
            return
        inputs = data[INPUT] if INPUT in data.column_names else [""] * len(data)
        self.users = [user_turn(i, x or "") for i, x in zip(data[INSTRUCTION], inputs, strict=True)]
        self.references = list(data[RESPONSE])
        self.prompts = []
        for instruction, input_text, response in zip(
            data[INSTRUCTION], inputs, self.references, strict=True
        ):
            ids, prompt_length = example_ids(
                tokenizer, instruction, input_text or "", response, config.max_length
            )
            self.prompts.append(ids[:prompt_length])

    def due(self, server_round: int) -> bool:
        return generation_due(self.config, server_round)

    def __call__(self, model) -> GenerationReport:
        generations = greedy_replies(
            model,
            self.tokenizer,
            self.prompts,
            self.config.max_new_tokens,
            self.config.batch_size,
        )
        scores = score(self.metric, generations, self.references)
        samples = [
            {"prompt": user, "reference": reference, "generation": generation}
            for user, reference, generation in zip(
                self.users, self.references, generations, strict=True
            )
        ]
        return GenerationReport(scores.column, scores.value, samples)
