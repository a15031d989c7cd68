"""The run config's robust-* keys reach every strategy's rule, and a strategy bounds a huge but
well-formed reply."""

import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedlora.config import RunConfig
from fedlora.method_config import robustness_of, server_optimizer_of
from fedlora.rules import RULES
from fedlora.rules.robust import Robustness
from fedlora.wire.messages import ADAPTER_RECORD, B_SUFFIX
from strategies.server_app import make_strategy
from tests.integration.test_hostile_replies import BAD, play_round, state_tensors


@pytest.mark.parametrize("name", sorted(n for n, rule in RULES.items() if rule.bounds_norms))
def test_make_strategy_passes_the_robust_options_to_the_rule(name):
    config = RunConfig.from_flower(
        {"strategy": name, "robust-norm-bound": 3, "robust-norm-median-multiple": 1.5}
    )
    strategy = make_strategy(config, None)
    assert strategy.rule.robustness == robustness_of(config)
    assert strategy.rule.robustness.norm_bound == 3.0


def scaled_b(factor: float):
    """Node BAD's B factors times ``factor``: a reply that passes every check."""

    def tamper(content):
        named = {}
        for key, array in content[ADAPTER_RECORD].items():
            tensor = torch.from_numpy(array.numpy().copy())
            named[key] = Array.from_torch_tensor(
                tensor * factor if key.endswith(B_SUFFIX) else tensor
            )
        content[ADAPTER_RECORD] = ArrayRecord(named)

    return tamper


def change_from_reference(name: str, **options) -> float:
    """The largest relative distance of the round's global model from the round without BAD."""
    strategy, *_ = play_round(name, scaled_b(1e6), **options)
    assert BAD not in strategy.dropped.get(1, {})
    reference, *_ = play_round(name, leave_out=True)
    got, expected = state_tensors(strategy), state_tensors(reference)
    return max(
        float(
            torch.linalg.matrix_norm(got[m] - expected[m]) / torch.linalg.matrix_norm(expected[m])
        )
        for m in ("m1", "m2")
    )


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("name", ["fedavg", "fedex", "flora", "flexlora", "hetlora"])
def test_a_strategy_bounds_a_huge_but_well_formed_reply(name):
    """B times 10^6 passes every reply check; norm bounding keeps the round near the one without
    it (3 dissimilar clients here, so near means within their own spread, not within 0.2)."""
    robust = Robustness(norm_median_multiple=1.0)
    assert change_from_reference(name) > 1e3
    assert change_from_reference(name, robustness=robust) < 3


@pytest.mark.parametrize(
    "name", sorted(n for n, rule in RULES.items() if rule.takes_server_optimizer)
)
def test_make_strategy_passes_the_server_optimizer_to_the_rule(name):
    config = RunConfig.from_flower(
        {"strategy": name, "server-optimizer": "adam", "server-lr": 0.01}
    )
    strategy = make_strategy(config, None)
    assert strategy.rule.server_optimizer == server_optimizer_of(config)
    assert strategy.rule.server_optimizer.kind == "adam"
