"""Every strategy x the tiny BERT and the tiny Llama for 3 rounds, with the project's ServerApp
(`strategies.server_app.run`) and ClientApp (`clients.app.client_app`) on an in-process grid of
three nodes of ranks 2, 4 and 8 (`tests.support.strategy_matrix` holds the checks; a few of these
cases also run on Ray in ``tests/e2e/test_simulation_e2e.py``)."""

from __future__ import annotations

import pytest
import torch

from clients.app import client_app
from strategies import STRATEGIES
from strategies.server_app import run
from tests.support.local_grid import LocalGrid
from tests.support.strategy_matrix import CASES, NUM_NODES, case_id, check_run, run_config

pytestmark = pytest.mark.usefixtures("task_identity", "one_thread")


@pytest.mark.parametrize(("strategy", "model"), CASES, ids=[case_id(case) for case in CASES])
def test_strategy_runs_three_rounds(strategy, model, tmp_path):
    config = run_config(strategy, model)
    grid = LocalGrid(client_app(config), num_nodes=NUM_NODES)
    run(grid, {**config, "run-dir": str(tmp_path)})
    check_run(strategy, model, tmp_path, grid)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_runs_three_rounds_under_the_cpus_bf16_autocast(strategy, tmp_path):
    """``cpu-autocast = "bfloat16"`` (the CPU recipes' ``auto`` on a CPU with native bf16): the
    clients' and the server's forward passes in bf16, the same checks, the exact rules within
    1e-5 (the probes and the aggregation run in float32)."""
    config = {**run_config(strategy, "tiny-bert"), "cpu-autocast": "bfloat16"}
    grid = LocalGrid(client_app(config), num_nodes=NUM_NODES)
    run(grid, {**config, "run-dir": str(tmp_path)})
    check_run(strategy, "tiny-bert", tmp_path, grid)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("strategy", "model"), CASES, ids=[case_id(case) for case in CASES])
def test_strategy_runs_three_rounds_with_the_clients_on_the_gpu(strategy, model, tmp_path):
    """The clients' steps, probes, training and evaluation on CUDA (their payloads, kept tensors
    and drifted bases moved there): the same checks, the exact rules within 1e-5."""
    config = {**run_config(strategy, model), "device": "cuda"}
    grid = LocalGrid(client_app(config), num_nodes=NUM_NODES)
    run(grid, {**config, "run-dir": str(tmp_path)})
    check_run(strategy, model, tmp_path, grid)
