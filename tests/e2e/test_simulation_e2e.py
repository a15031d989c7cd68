"""Strategies in Flower's real simulation engine on Ray: three nodes of ranks 2, 4 and 8 as Ray
actors, for 3 rounds, with the checks of the in-process strategy matrix
(`tests.support.strategy_matrix`). The cases cover what only Ray shows: partial participation
with the base store read by other processes (FedEx-LoRA on the Llama), the node state that
FedSA-LoRA keeps between rounds, Fed-SB's extra start-up exchange, and the two methods whose
clients hold what no other does: FFA-LoRA's A drawn from the seed in each actor (and its tail
folded into the base), FSLoRA's per-client sketches; and LEGEND, whose actors build models of
different depths (peft's ``layers_to_transform``) and rank patterns from their capacity class.

The ServerApp is the project's own (`strategies.server_app.run`) on Flower's grid, wrapped to
record every message and reply; the ClientApp is `clients.app.client_app`. `run_simulation`
passes an empty run_config, so both apps are bound to the run config here. The cases that one
pytest worker runs join one Ray instance in turn, as the runs of ``fedlora compare`` do.
"""

from __future__ import annotations

import pytest

from tests.support.recording_grid import shared_test_ray, simulate_on_ray
from tests.support.strategy_matrix import NUM_NODES, case_id, check_run, run_config

pytestmark = pytest.mark.slow

RAY_CASES = [
    ("fedex", "tiny-llama"),
    ("fedsa", "tiny-bert"),
    ("fedsb", "tiny-bert"),
    ("ffalora", "tiny-bert"),
    ("fslora", "tiny-bert"),
    ("legend", "tiny-bert"),
]


@pytest.fixture(scope="module")
def ray_address():
    """One Ray for the cases that a pytest worker runs, joined by each in turn."""
    with shared_test_ray() as address:
        yield address


@pytest.mark.parametrize(("strategy", "model"), RAY_CASES, ids=[case_id(c) for c in RAY_CASES])
def test_strategy_runs_three_rounds_on_ray(strategy, model, tmp_path, ray_address):
    grid = simulate_on_ray(run_config(strategy, model), tmp_path, NUM_NODES, ray_address)
    check_run(strategy, model, tmp_path, grid)
