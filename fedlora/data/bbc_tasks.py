"""Instruction tasks made from the BBC News corpus (each article's first line is its headline).

``bbc-topic``: the instruction asks for the article's topic in one word, naming the five topics;
the input is the whole article; the response is the topic's name. ``bbc-headline``: the
instruction asks for a headline; the input is the article without its headline line; the response
is that headline. Both keep the topic as ``label``, so the label partitioners split them by topic.
"""

from __future__ import annotations

import datasets

from fedlora.data.columns import INPUT, INSTRUCTION, LABEL, RESPONSE, TEXT

TOPIC_INSTRUCTION = "What is the topic of this news article? Answer with one word: {topics}."
HEADLINE_INSTRUCTION = "Write a headline for this news article."


def headline_and_body(text: str) -> tuple[str, str]:
    """The article's first non-empty line and the rest, both stripped."""
    headline, _, body = text.strip().partition("\n")
    return headline.strip(), body.strip()


def topic_task(news: datasets.Dataset) -> datasets.Dataset:
    """``bbc-topic`` from the corpus (``text``, ``label``): one example per article."""
    names = news.features[LABEL].names
    instruction = TOPIC_INSTRUCTION.format(topics=", ".join(names[:-1]) + " or " + names[-1])
    texts, labels = news[TEXT], news[LABEL]
    return instruction_dataset(
        [instruction] * len(texts),
        [text.strip() for text in texts],
        [names[label] for label in labels],
        labels,
        news.features[LABEL],
    )


def headline_task(news: datasets.Dataset) -> datasets.Dataset:
    """``bbc-headline`` from the corpus (``text``, ``label``): one example per article."""
    pairs = [headline_and_body(text) for text in news[TEXT]]
    return instruction_dataset(
        [HEADLINE_INSTRUCTION] * len(pairs),
        [body for _, body in pairs],
        [headline for headline, _ in pairs],
        news[LABEL],
        news.features[LABEL],
    )


def instruction_dataset(
    instructions: list[str],
    inputs: list[str],
    responses: list[str],
    labels: list[int],
    label_feature: datasets.ClassLabel,
) -> datasets.Dataset:
    string = datasets.Value("string")
    features = datasets.Features(
        {INSTRUCTION: string, INPUT: string, RESPONSE: string, LABEL: label_feature}
    )
    return datasets.Dataset.from_dict(
        {INSTRUCTION: instructions, INPUT: inputs, RESPONSE: responses, LABEL: labels},
        features=features,
    )
