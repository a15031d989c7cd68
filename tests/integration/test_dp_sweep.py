"""The DP sweep: budgets parsed and turned into run keys, accuracy drops, the DP recipes (a tiny
sweep on Ray is in ``tests/e2e/test_dp_sweep_on_ray.py``)."""

from __future__ import annotations

import math

import pytest

from fedlora.errors import ConfigError
from simulations.dp_sweep import (
    budget_name,
    budget_overrides,
    parse_epsilons,
    with_accuracy_drop,
)
from simulations.recipe_files import RECIPES_DIR
from simulations.recipes import load_recipe, resolve


def test_budgets_parse_in_order_and_inf_means_no_dp():
    assert parse_epsilons("1, 3,8,inf") == (1.0, 3.0, 8.0, math.inf)
    assert budget_overrides(math.inf) == {"dp-sample": False}
    assert budget_overrides(3.0) == {"dp-sample": True, "dp-target-epsilon": 3.0}
    assert [budget_name(e) for e in (0.5, 3.0, math.inf)] == ["eps-0.5", "eps-3", "eps-inf"]


@pytest.mark.parametrize("text", ["0,1", "1,x", "3,3", "-1", ""])
def test_bad_budgets_are_refused_naming_the_option(text):
    with pytest.raises(ConfigError, match="--epsilons"):
        parse_epsilons(text)


def test_accuracy_drop_is_measured_from_the_non_private_run():
    runs = [
        {"target_epsilon": 1.0, "final_accuracy": 0.5},
        {"target_epsilon": math.inf, "final_accuracy": 0.9},
    ]
    assert [r["accuracy_drop"] for r in with_accuracy_drop(runs)] == pytest.approx([0.4, 0.0])
    alone = with_accuracy_drop([{"target_epsilon": 1.0, "final_accuracy": 0.5}])
    assert alone[0]["accuracy_drop"] is None


def test_dp_recipes_resolve_with_dp_on():
    for name in ("dp-sample", "dp-sample-gpu"):
        config = resolve(load_recipe(RECIPES_DIR / f"{name}.toml")).run_config
        assert config.dp_sample and config.model == "minilm" and config.dataset == "bbcnews"
