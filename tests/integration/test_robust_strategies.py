"""The run config's robust-* keys reach every strategy's rule."""

import pytest

from fedlora.config import RunConfig
from fedlora.rules import RULES
from strategies.server_app import make_strategy


@pytest.mark.parametrize("name", sorted(RULES))
def test_make_strategy_passes_the_robust_options_to_the_rule(name):
    config = RunConfig.from_flower(
        {"strategy": name, "robust-norm-bound": 3, "robust-norm-median-multiple": 1.5}
    )
    strategy = make_strategy(config, None)
    assert strategy.rule.robustness == config.robustness
    assert strategy.rule.robustness.norm_bound == 3.0
