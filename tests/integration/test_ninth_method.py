"""A method defined here only, registered as `docs/design.md` says, runs a round with the project's
ServerApp and ClientApp on an in-process grid: a method is its rule, its registry entry and its
strategy binding, and nothing else is switched on its name."""

from __future__ import annotations

import math

import pytest
import torch

from clients.app import client_app
from fedlora.errors import ConfigError
from fedlora.lora.lowrank import LowRank
from fedlora.method_config import parse_run_config
from fedlora.rules import RULES, FedAvg
from fedlora.wire.messages import (
    ADAPTER_RECORD,
    B_SUFFIX,
    METRICS_RECORD,
    NUM_EXAMPLES_KEY,
    scale_key,
)
from strategies import LoRAStrategy
from strategies.server_app import run
from tests.support.local_grid import LocalGrid
from tests.support.strategy_matrix import (
    NUM_NODES,
    RANKS,
    metrics_rows,
    run_config,
    train_exchanges,
)

pytestmark = pytest.mark.usefixtures("task_identity", "one_thread")


class HalfStepFedAvg(FedAvg):
    """FedAvg with a server step of 1/2: X_t = X_{t-1} + (sum_i p_i pad(X_i) - X_{t-1}) / 2 for
    both folded factors."""

    name = "halfstep"
    client_dp_refusal = "a half step of averaged factors is not a sum of client tensors"

    def _average_factors(self, state, updates, weights) -> dict:
        averaged = super()._average_factors(state, updates, weights)
        return {
            module: LowRank(
                (state.factors[module].U + mean.U) / 2, (state.factors[module].V + mean.V) / 2
            )
            for module, mean in averaged.items()
        }


class HalfStepStrategy(LoRAStrategy):
    rule_class = HalfStepFedAvg


@pytest.fixture
def halfstep_registered(monkeypatch):
    """The ninth method in the registry for one test."""
    monkeypatch.setitem(RULES, HalfStepFedAvg.name, HalfStepFedAvg)


def half_padded_b_average(replies) -> dict[str, torch.Tensor]:
    """sum_i p_i pad(sqrt(s_i) B_i) / 2 per module, from the replies on the wire (the initial
    B is 0, so the half step from it halves the average)."""
    counts = [int(r.content.metric_records[METRICS_RECORD][NUM_EXAMPLES_KEY]) for r in replies]
    total = sum(counts)
    half: dict[str, torch.Tensor] = {}
    for reply, count in zip(replies, counts):
        config = reply.content.config_records["config"]
        arrays = reply.content.array_records[ADAPTER_RECORD].to_torch_state_dict()
        for key, B in arrays.items():
            if not key.endswith(B_SUFFIX):
                continue
            module = key.removesuffix(B_SUFFIX)
            folded = math.sqrt(float(config[scale_key(module)])) * B.double()
            column = half.setdefault(
                module, torch.zeros(B.shape[0], max(RANKS), dtype=torch.float64)
            )
            column[:, : B.shape[1]] += count / total * folded / 2
    return half


def test_a_method_defined_in_a_test_runs_a_round(halfstep_registered, tmp_path):
    config = {**run_config("fedavg", "tiny-bert"), "strategy": "halfstep", "num-server-rounds": 1}
    grid = LocalGrid(client_app(config), num_nodes=NUM_NODES)
    strategy = run(grid, {**config, "run-dir": str(tmp_path)})
    assert isinstance(strategy, HalfStepStrategy)
    [row] = metrics_rows(tmp_path)
    assert row["strategy"] == "halfstep" and row["clients"] == NUM_NODES
    [(_, replies)] = train_exchanges(grid)
    expected = half_padded_b_average(replies)
    assert expected and all(U.abs().max() > 0 for U in expected.values())
    for module, U in expected.items():
        torch.testing.assert_close(
            strategy.state.factors[module].U.double(), U, atol=1e-6, rtol=1e-5
        )


def test_a_method_declares_its_client_dp_refusal(halfstep_registered):
    with pytest.raises(ConfigError, match="not a sum of client tensors.*use one of"):
        parse_run_config({"strategy": "halfstep", "dp-client": True})
    assert parse_run_config({"strategy": "halfstep"}).strategy == "halfstep"
