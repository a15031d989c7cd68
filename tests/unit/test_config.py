"""RunConfig: parsing Flower's run_config, refusing bad keys and values, the rank profile; the
checks that need the methods (`fedlora.method_config`)."""

from collections import Counter

import pytest

from fedlora.config import RunConfig, ServerAppSettings, every_k_rounds
from fedlora.errors import ConfigError
from fedlora.method_config import parse_run_config, robustness_of

PROFILE = "4:0.3,8:0.5,16:0.2"


def test_empty_run_config_gives_the_demo_defaults():
    config = RunConfig.from_flower({})
    assert config == RunConfig()
    assert (config.strategy, config.model, config.dataset, config.partitioner) == (
        "fedex",
        "minilm",
        "bbcnews",
        "dirichlet",
    )
    assert config.target_module_names == ("query", "value")
    assert config.head_module_names == ("classifier", "pooler")
    assert (config.lora_rank, config.lora_alpha, config.max_length) == (8, 16.0, 96)


def test_kebab_keys_map_to_fields_and_ints_pass_as_floats():
    config = RunConfig.from_flower(
        {"lora-rank": 4, "learning-rate": 1, "rslora": True, "target-modules": "query, key"}
    )
    assert config.lora_rank == 4
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
    assert config.rslora is True
    assert config.target_module_names == ("query", "key")


@pytest.mark.parametrize(
    ("typo", "meant"),
    [("lora-rnk", "lora-rank"), ("lerning-rate", "learning-rate"), ("base-change", "base-changes")],
)
def test_unknown_key_suggests_the_closest_known_one(typo, meant):
    with pytest.raises(ConfigError) as error:
        RunConfig.from_flower({typo: 4})
    assert str(error.value) == f"unknown key {typo!r}; did you mean {meant!r}?"


def test_unknown_key_far_from_every_key_points_to_the_reference():
    with pytest.raises(ConfigError, match="unknown key 'zzz'.*docs/config.md"):
        RunConfig.from_flower({"zzz": 1})


def test_server_app_settings_are_checked_apart_from_the_run_config():
    values = {"run-dir": "runs/x", "base-changes": "messages", "resume": True, "lora-rank": 4}
    settings = ServerAppSettings.from_flower(values)
    assert (settings.run_dir, settings.base_changes, settings.resume) == (
        "runs/x",
        "messages",
        True,
    )
    with pytest.raises(ConfigError, match="base-changes = 'email'"):
        ServerAppSettings.from_flower({"base-changes": "email"})
    with pytest.raises(ConfigError, match="'resume'"):
        ServerAppSettings.from_flower({"resume": 1})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("lora-rank", 0),
        ("lora-rank", "8"),
        ("lora-rank", True),
        ("rslora", 1),
        ("test-fraction", 1.0),
        ("fraction-train", 0.0),
        ("dirichlet-alpha", -0.5),
        ("partitioner", "natural"),
        ("device", "tpu"),
        ("rank-profile", "4:0.5,8:0.4"),
        ("rank-profile", "four:1"),
        ("evaluate-every", 0),
        ("evaluate-every", "2"),
        ("evaluate-every", 1.0),
    ],
)
def test_bad_value_is_named(key, value):
    with pytest.raises(ConfigError, match=key):
        RunConfig.from_flower({key: value})


def test_unknown_strategy_is_refused_by_the_methods_layer_with_a_suggestion():
    with pytest.raises(ConfigError, match="strategy = 'fedexx': did you mean 'fedex'"):
        parse_run_config({"strategy": "fedexx"})
    with pytest.raises(ConfigError, match="strategy = 'fedprox'"):
        parse_run_config({"strategy": "fedprox"})


def test_task_sets_the_default_targets_and_head():
    causal = RunConfig.from_flower({"model": "tiny-llama", "task": "causal-lm"})
    assert causal.target_module_names == ("q_proj", "v_proj")
    assert causal.head_module_names == ()
    chosen = RunConfig.from_flower(
        {"model": "tiny-llama", "task": "causal-lm", "modules-to-save": "lm_head"}
    )
    assert chosen.head_module_names == ("lm_head",)


def test_a_named_model_refuses_the_other_task():
    with pytest.raises(ConfigError, match="tiny-llama"):
        RunConfig.from_flower({"model": "tiny-llama", "task": "classification"})


def test_a_named_model_gives_its_task_when_none_is_set():
    assert RunConfig.from_flower({"model": "tiny-llama"}).task == "causal-lm"
    assert RunConfig.from_flower({"model": "tiny-bert"}).task == "classification"


@pytest.mark.parametrize(
    ("clients", "expected"),
    [
        (10, {4: 3, 8: 5, 16: 2}),
        (100, {4: 30, 8: 50, 16: 20}),
        (7, {4: 2, 8: 4, 16: 1}),  # quotas 2.1, 3.5, 1.4: the 7th goes to the largest remainder
        (1, {8: 1}),
    ],
)
def test_rank_profile_assigns_its_fractions(clients, expected):
    config = RunConfig(rank_profile=PROFILE)
    ranks = [config.rank_for(i, clients) for i in range(clients)]
    assert Counter(ranks) == expected
    assert ranks == sorted(ranks)  # blocks of consecutive ids, in the profile's order
    assert ranks == [config.rank_for(i, clients) for i in range(clients)]
    assert config.max_rank == 16


def test_without_a_profile_every_node_takes_lora_rank_unless_it_sets_its_own():
    config = RunConfig(lora_rank=6)
    assert [config.rank_for(i, 3) for i in range(3)] == [6, 6, 6]
    assert config.rank_for(1, 3, node_rank=2) == 2
    with pytest.raises(ConfigError, match="partition id 3"):
        config.rank_for(3, 3)


def test_robust_keys_become_the_rules_options():
    config = parse_run_config(
        {
            "strategy": "fedavg",
            "robust-norm-median-multiple": 2,
            "robust-aggregation": "median",
            "robust-trim-fraction": 0.2,
        }
    )
    robustness = robustness_of(config)
    assert (robustness.norm_median_multiple, robustness.combination) == (2.0, "median")
    assert robustness.trim_fraction == 0.2 and robustness.norm_bound == 0.0


@pytest.mark.parametrize(
    "values, key",
    [
        ({"robust-norm-bound": -1}, "robust-norm-bound"),
        ({"robust-norm-median-multiple": float("inf")}, "robust-norm-median-multiple"),
        ({"robust-aggregation": "mode"}, "robust-aggregation"),
        ({"robust-trim-fraction": 0.5}, "robust-trim-fraction"),
        ({"strategy": "fedex", "robust-aggregation": "median"}, "robust-aggregation"),
        ({"strategy": "fedavg", "dp-client": True, "robust-norm-bound": 1}, "robust-"),
    ],
)
def test_robust_keys_out_of_range_or_not_for_the_strategy_are_refused(values, key):
    with pytest.raises(ConfigError, match=key):
        parse_run_config(values)


@pytest.mark.parametrize(
    ("server_round", "every", "num_rounds", "expected"),
    [
        (0, 1, 5, False),
        (1, 1, 5, True),
        (1, 2, 5, False),
        (2, 2, 5, True),
        (3, 2, 5, False),
        (4, 2, 5, True),
        (5, 2, 5, True),
        (3, 3, 6, True),
        (5, 3, 6, False),
        (6, 3, 6, True),
        (4, 7, 5, False),
        (5, 7, 5, True),
    ],
)
def test_every_k_rounds_are_the_multiples_and_the_last_round(
    server_round, every, num_rounds, expected
):
    assert every_k_rounds(server_round, every, num_rounds) is expected


def test_evaluate_every_names_the_rounds_that_evaluate():
    assert all(RunConfig().evaluates(server_round) for server_round in range(1, 6))
    config = RunConfig.from_flower({"num-server-rounds": 5, "evaluate-every": 2})
    assert [r for r in range(1, 6) if config.evaluates(r)] == [2, 4, 5]


def test_generation_every_must_be_a_multiple_of_evaluate_every():
    for generation_every in (0, 2, 4):
        RunConfig.from_flower({"evaluate-every": 2, "generation-every": generation_every})
    for generation_every in (1, 3):
        with pytest.raises(
            ConfigError,
            match=f"generation-every = {generation_every} must be a multiple of evaluate-every = 2",
        ):
            RunConfig.from_flower({"evaluate-every": 2, "generation-every": generation_every})
