"""Run configs shared by the in-process tests (tiny BERT on BBC News, one short local step), and
a recipe moved onto the in-process engine."""

import dataclasses

from simulations.recipes import Recipe


def on_in_process_engine(recipe: Recipe) -> Recipe:
    """``recipe`` with its clients in this process (`simulations.in_process`) instead of Ray."""
    return dataclasses.replace(
        recipe, simulation=dataclasses.replace(recipe.simulation, engine="in-process")
    )


TINY_BERT_RUN = {
    "model": "tiny-bert",
    "partitioner": "iid",
    "max-length": 16,
    "batch-size": 4,
    "local-steps": 1,
    "rank-profile": "2:0.5,4:0.5",
    "learning-rate": 0.01,
}
"""Two capacity classes, ranks 2 and 4, half of the clients each."""
