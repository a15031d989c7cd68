"""Greedy generation in left-padded batches, the answer-matching and ROUGE-L scores, and the\nrounds and prompts of the server's generation evaluation."""

import math

import datasets
import pytest
import torch

from fedlora.config import RunConfig
from fedlora.data.hashing_tokenizer import HashingTokenizer
from fedlora.errors import ConfigError
from fedlora.models.base_model import TINY_VOCAB, tiny_llama
from fedlora.models.generation import (
    answer_correct,
    generation_metric,
    greedy_replies,
    left_padded,
    normalise,
    rouge_l,
    score,
)
from fedlora.training.generation_eval import GenerationEvaluation


@pytest.mark.parametrize(
    ("generation", "reference", "correct"),
    [
        ("business", "business", True),
        ("Business.", "business", True),
        ("  The topic is: BUSINESS!\n", "business", True),
        ("tech", "Tech", True),
        ("businesses", "business", False),
        ("sport or business", "politics", False),
        ("", "business", False),
        ("anything", "", False),
        ("It is entertainment-news", "entertainment news", True),
        ("sci_fi", "sci fi", True),
    ],
)
def test_answer_matching_finds_the_normalised_reference_as_whole_words(
    generation, reference, correct
):
    assert answer_correct(generation, reference) is correct


def test_normalise_lowers_and_turns_punctuation_and_whitespace_into_single_spaces():
    assert normalise("  Hello,\tWorld!!  It's\n2026. ") == "hello world it s 2026"


def test_rouge_l_is_the_f1_of_the_longest_common_word_subsequence():
    # LCS of "the cat sat on the mat" and "the cat lay on the mat": the cat on the mat (5 words
    # of 6 each): precision = recall = F1 = 5/6.
    assert math.isclose(rouge_l("The cat lay on the mat.", "the cat sat on the mat"), 5 / 6)
    # 2 of 4 generated words, 2 of 3 reference words: F1 = 2PR / (P + R) = 4/7.
    assert math.isclose(rouge_l("police arrest two men", "police arrest suspect"), 4 / 7)
    assert rouge_l("nothing shared", "else entirely") == 0.0


def test_scores_are_means_over_examples_under_their_column():
    answers = score("answer", ["Sport.", "tech", "politics"], ["sport", "business", "politics"])
    assert (answers.column, answers.value) == ("answer_accuracy", 2 / 3)
    rouge = score("rouge-l", ["a b", "c"], ["a b", "d"])
    assert (rouge.column, rouge.value) == ("rouge_l", 0.5)


def test_the_metric_follows_the_task_unless_set():
    assert generation_metric("auto", "bbc-topic") == "answer"
    assert generation_metric("auto", "bbc-headline") == "rouge-l"
    assert generation_metric("auto", "json:mine.json") == "answer"
    assert generation_metric("rouge-l", "bbc-topic") == "rouge-l"
    with pytest.raises(ConfigError, match="generation-metric"):
        generation_metric("bleu", "bbc-topic")


def test_left_padding_puts_every_prompt_against_the_right_edge():
    batch = left_padded([[5, 6, 7], [8]], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_batched_greedy_generation_equals_one_prompt_at_a_time(one_thread):
    torch.manual_seed(0)
    model, tokenizer = tiny_llama(), HashingTokenizer(TINY_VOCAB)
    prompts = [
        [1, *tokenizer.token_ids(text)]
        for text in ("say red", "a longer prompt about the colour green and more", "blue?")
    ]
    batched = greedy_replies(model, tokenizer, prompts, max_new_tokens=8, batch_size=3)
    alone = greedy_replies(model, tokenizer, prompts, max_new_tokens=8, batch_size=1)
    assert batched == alone
    assert all(len(reply.split()) == 8 for reply in batched)  # no EOS from random weights


def test_each_row_stops_at_eos_and_nothing_after_it_is_kept(one_thread):
    """The head is forced to say 7, then EOS (row 0) or 8 (row 1), then 9 forever."""
    model, tokenizer = tiny_llama(), HashingTokenizer(TINY_VOCAB)
    steps = iter([[7, 7], [tokenizer.eos_token_id, 8]])

    def forced(module, inputs, logits):
        tokens = next(steps, [9, 9])
        forced_logits = torch.full_like(logits, -1e4)
        for row, token in enumerate(tokens):
            forced_logits[row, -1, token] = 0.0
        return forced_logits

    model.lm_head.register_forward_hook(forced)
    replies = greedy_replies(model, tokenizer, [[1, 5, 6], [1, 4]], max_new_tokens=4, batch_size=2)
    assert replies == ["w7", "w7 w8 w9 w9"]


def generation_evaluation(every: int, rounds: int, **columns) -> GenerationEvaluation:
    config = RunConfig(
        model="tiny-llama",
        task="causal-lm",
        num_server_rounds=rounds,
        generation_every=every,
        max_length=16,
    )
    data = datasets.Dataset.from_dict(
        columns or {"instruction": ["Say red.", "Say blue."], "response": ["red", "blue"]}
    )
    return GenerationEvaluation(config, data, HashingTokenizer(TINY_VOCAB))


def test_generation_rounds_are_the_multiples_of_k_and_the_last():
    due = generation_evaluation(every=2, rounds=5).due
    assert [r for r in range(6) if due(r)] == [2, 4, 5]
    assert not any(generation_evaluation(every=0, rounds=5).due(r) for r in range(6))


def test_generation_prompts_are_the_training_prompts_and_need_instructions():
    evaluation = generation_evaluation(every=1, rounds=1)
    assert evaluation.prompts[0] == [
        1,
        *HashingTokenizer(TINY_VOCAB).token_ids("### Instruction:\nSay red.\n\n### Response:\n"),
    ]
    assert evaluation.references == ["red", "blue"]
    with pytest.raises(ConfigError, match="generation-every needs instruction data"):
        generation_evaluation(every=1, rounds=1, text=["plain text"])
    with pytest.raises(ConfigError, match="client-generation needs generation-every"):
        RunConfig(client_generation=True)
