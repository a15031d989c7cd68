"""The run config's checks that depend on the methods: the strategy's name, the options its rule
takes (client-level DP, robust aggregation), and those options as the rule's."""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from fedlora.config import RunConfig, Scalar
from fedlora.errors import ConfigError
from fedlora.lora.server_optimizer import ServerOptimizer
from fedlora.privacy.client_level import check_client_dp_rule
from fedlora.rules import RULES
from fedlora.rules.base import check_robustness
from fedlora.rules.robust import Robustness


def parse_run_config(run_config: Mapping[str, Scalar]) -> RunConfig:
    """`RunConfig.from_flower`, then the checks that need the methods (`check_method_options`)."""
    config = RunConfig.from_flower(run_config)
    check_method_options(config)
    return config


def check_method_options(config: RunConfig) -> None:
    """Raise `ConfigError` for an unknown strategy or an option its rule does not take."""
    if config.strategy not in RULES:
        close = difflib.get_close_matches(config.strategy, list(RULES), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"strategy = {config.strategy!r}: {hint}choose one of {sorted(RULES)}")
    if config.dp_client:
        check_client_dp_rule(config.strategy)
    robustness = robustness_of(config)
    check_robustness(RULES[config.strategy], robustness)
    if config.dp_client and (robustness.bounds_norms or robustness.combination != "mean"):
        raise ConfigError(
            "robust-* options do not apply with dp-client: client-level DP clips every update and "
            "its analysis assumes the noised mean"
        )
    check_server_optimizer(config)


def robustness_of(config: RunConfig) -> Robustness:
    """The ``robust-*`` keys as the rule's options."""
    return Robustness(
        norm_bound=config.robust_norm_bound,
        norm_median_multiple=config.robust_norm_median_multiple,
        combination=config.robust_aggregation,
        trim_fraction=config.robust_trim_fraction,
    )


def server_optimizer_of(config: RunConfig) -> ServerOptimizer:
    """The ``server-*`` keys as a server optimizer (refused when out of range)."""
    return ServerOptimizer(
        kind=config.server_optimizer,
        lr=config.server_lr,
        momentum=config.server_momentum,
        beta1=config.server_beta1,
        beta2=config.server_beta2,
        eps=config.server_eps,
    )


def check_server_optimizer(config: RunConfig) -> None:
    """``server-*`` only for a strategy that takes a server optimizer and not with client-level
    DP; ``fedprox-mu`` not with DP-SGD (Opacus sets the gradients itself)."""
    optimizer = server_optimizer_of(config)
    if optimizer != ServerOptimizer() and not RULES[config.strategy].takes_server_optimizer:
        takers = sorted(name for name, rule in RULES.items() if rule.takes_server_optimizer)
        raise ConfigError(
            f"server-* options do not apply to strategy {config.strategy!r}; strategies with a "
            f"server optimizer: {takers}"
        )
    if optimizer != ServerOptimizer() and config.dp_client:
        raise ConfigError(
            "server-* options do not apply with dp-client: the private aggregate is applied as "
            "the noised mean its analysis assumes"
        )
    if config.fedprox_mu > 0 and config.dp_sample:
        raise ConfigError(
            "fedprox-mu does not apply with dp-sample: DP-SGD computes each step's gradient from "
            "clipped per-example gradients, which the proximal term is not"
        )
