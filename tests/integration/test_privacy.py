"""Sample-level DP (Opacus DP-SGD on the clients): the epsilon a client reports against a fresh
accountant fed by the test's own count, target-epsilon noise over the whole run, noise-free DP-SGD
against plain training, DoRA refused, hooks removed from cached models (``max-epsilon`` on Ray is
in ``tests/e2e/test_privacy_on_ray.py``)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from flwr.app import MessageType
from opacus.accountants.utils import get_noise_multiplier
from peft import LoraConfig, get_peft_model
from torch import nn

from clients.app import client_app
from fedlora.config import RunConfig
from fedlora.data import encoding, partitioning
from fedlora.errors import ConfigError
from fedlora.lora.fedsb_init import estimate_gradient, estimate_private_gradient
from fedlora.models.base_model import load_base_model, with_lora
from fedlora.privacy.accounting import history_from_values, history_to_values
from fedlora.privacy.sample_level import (
    NOISE_TOLERANCE,
    client_plan,
    example_loader,
    private_training,
)
from fedlora.training.local import train_local, train_private
from strategies.server_app import run
from tests.support.local_grid import FIRST_NODE_ID, LocalGrid
from tests.support.privacy import TINY, TINY_FIELDS, fresh_epsilon

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def tiny_config(**fields) -> RunConfig:
    return RunConfig(**{**TINY_FIELDS, "dp_sample": True, **fields})


def tiny_lora(config: RunConfig):
    base = load_base_model(config)
    model = with_lora(base, 4, 8.0, False, config.target_module_names, config.head_module_names)
    return base, model


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---- accounting -----------------------------------------------------------------------------------


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("strategy", "accountant"), [("fedavg", "rdp"), ("fedsb", "prv")])
def test_reported_epsilon_is_a_fresh_accountant_over_the_rounds_a_client_trained(
    strategy, accountant, tmp_path
):
    """3 rounds, 2 of 3 nodes training per round (seed 2: the nodes train 1, 2 and 3 rounds),
    through the real ServerApp and ClientApp: each client's last reported epsilon equals a fresh
    accountant fed with the noise, its sample rate 1 / ceil(N_i / batch-size) and local-steps x
    (rounds it trained in, + 1 for Fed-SB's initialisation), N_i counted here from the partition."""
    config = {
        **TINY,
        "strategy": strategy,
        "num-server-rounds": 3,
        "seed": 2,
        "fraction-train": 0.5,
        "fraction-evaluate": 0.34,
        "min-evaluate-nodes": 1,
        "dp-sample": True,
        "dp-noise-multiplier": 1.3,
        "dp-accountant": accountant,
    }
    grid = LocalGrid(client_app(config), num_nodes=3)
    run(grid, {**config, "run-dir": str(tmp_path)})
    assert not any(reply.has_error() for reply in grid.replies)
    trained = {pid: 0 for pid in range(3)}
    for message in grid.sent:
        if message.metadata.message_type == MessageType.TRAIN:
            trained[message.metadata.dst_node_id - FIRST_NODE_ID] += 1
    assert sorted(trained.values()) == [1, 2, 3]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last_reported = {pid: eps for row in rows for pid, eps in row["epsilon"].items()}
    run_config = RunConfig.from_flower(config)
    init_steps = 1 if strategy == "fedsb" else 0
    for pid, rounds in trained.items():
        n = len(partitioning.client_data(run_config, pid, 3).train)
        rate = 1 / math.ceil(n / 8)
        expected = fresh_epsilon(accountant, 1.3, rate, 2 * (rounds + init_steps), 1e-5)
        assert last_reported[str(pid)] == pytest.approx(expected, abs=1e-6)
    assert rows[-1]["epsilon_max"] == max(rows[-1]["epsilon"].values())


@pytest.mark.parametrize(("strategy", "dp_rounds", "steps"), [("fedavg", 0, 12), ("fedsb", 2, 9)])
def test_target_epsilon_sets_the_noise_for_the_whole_run(strategy, dp_rounds, steps):
    """The noise spends the target (within Opacus' tolerance, never above) over dp-rounds
    (0: num-server-rounds) x local-steps, plus the local-steps of Fed-SB's start."""
    config = RunConfig(
        strategy=strategy,
        num_server_rounds=4,
        local_steps=3,
        batch_size=16,
        dp_sample=True,
        dp_target_epsilon=3.0,
        dp_rounds=dp_rounds,
    )
    plan = client_plan(config, 500)
    rate = 1 / math.ceil(500 / 16)
    assert plan.sample_rate == rate
    spent = fresh_epsilon("rdp", plan.noise_multiplier, rate, steps, 1e-5)
    assert 3.0 - NOISE_TOLERANCE <= spent <= 3.0
    one_round = get_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-5, sample_rate=rate, steps=3, accountant="rdp"
    )
    assert plan.noise_multiplier > one_round


def test_delta_is_capped_at_one_over_the_client_s_examples():
    """dp-delta above 1 / N_i is capped for that client (a stronger guarantee), not refused."""
    config = RunConfig(dp_sample=True, dp_delta=0.01)
    assert client_plan(config, 400).delta == 1 / 400
    assert client_plan(config, 50).delta == 0.01


def test_history_survives_as_plain_values_and_another_accountant_is_refused():
    history = [(1.1, 0.02, 6), (0.9, 0.02, 3)]
    values = history_to_values(history, "rdp")
    assert all(isinstance(v, str | list) for v in values.values())
    assert history_from_values(values, "rdp") == history
    with pytest.raises(ConfigError, match="dp-accountant"):
        history_from_values(values, "prv")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("dp-noise-multiplier", -1.0),
        ("dp-delta", 0.0),
        ("dp-max-grad-norm", 0.0),
        ("dp-accountant", "gdp"),
        ("dp-grad-sample-mode", "ew"),
        ("max-epsilon", math.inf),
    ],
)
def test_bad_dp_keys_are_refused_naming_them(key, value):
    with pytest.raises(ConfigError, match=key):
        RunConfig.from_flower({key: value})


# ---- DP-SGD on real models ------------------------------------------------------------------------


def test_noise_free_unclipped_dp_sgd_equals_plain_training():
    """Noise 0, max-grad-norm 1e6 (no clipping), Poisson sampling off, batch = all N examples:
    Opacus' sum / expected batch size (N) is the plain mean, so three AdamW steps agree to 1e-9 in
    float64. Dropout is off, as both runs see the same examples in different row orders."""
    n = 48
    config = tiny_config(
        batch_size=n,
        local_steps=3,
        dp_noise_multiplier=0.0,
        dp_max_grad_norm=1e6,
        dp_poisson_sampling=False,
    )
    train = partitioning.client_data(config, 0, 3).train.select(range(n))
    plan = client_plan(config, n)
    assert plan.sample_rate == 1.0
    runs = []
    for private in (False, True):
        base, model = tiny_lora(config)
        model.double()
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        if private:
            _, history = train_private(model, train, base.tokenizer, config, plan, [], CPU, 0)
            assert history == [(0.0, 1.0, 3)]
        else:
            batches = encoding.batches(train, base.tokenizer, config.max_length, n, seed=0, steps=3)
            train_local(model, batches, 3, config.learning_rate, 0.0, CPU, seed=0)
        runs.append(trainable(model))
    plain, private = runs
    assert plain.keys() == private.keys()
    for name in plain:
        torch.testing.assert_close(private[name], plain[name], rtol=0, atol=1e-9)
    assert any((t != 0).any() for name, t in plain.items() if "lora_B" in name)


def test_private_training_leaves_the_cached_model_unhooked_and_counts_every_round():
    config = tiny_config()
    base, model = tiny_lora(config)
    train = partitioning.client_data(config, 0, 3).train
    plan = client_plan(config, len(train))
    history = []
    for round_seed in (1, 2):
        before = trainable(model)
        _, history = train_private(
            model, train, base.tokenizer, config, plan, history, CPU, round_seed
        )
        assert any((trainable(model)[k] != before[k]).any() for k in before if "lora_B" in k)
        assert not hasattr(model, "autograd_grad_sample_hooks")
        assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
        assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert history == [(1.0, plan.sample_rate, 4)]


def test_ghost_clipping_trains_as_the_hooks_do():
    """Ghost clipping clips the same per-example gradients without materialising them: with the
    same seeds, the same trained weights."""
    weights = []
    for mode in ("hooks", "ghost"):
        config = tiny_config(dp_grad_sample_mode=mode, dp_max_grad_norm=0.05)
        base, model = tiny_lora(config)
        train = partitioning.client_data(config, 0, 3).train
        plan = client_plan(config, len(train))
        train_private(model, train, base.tokenizer, config, plan, [], CPU, 3)
        weights.append(trainable(model))
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-5, atol=1e-6)


def test_dora_is_refused_before_anything_is_hooked():
    config = tiny_config()
    base = load_base_model(config)
    model = get_peft_model(
        base.model, LoraConfig(r=4, target_modules=["query", "value"], use_dora=True)
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    train = partitioning.client_data(config, 0, 3).train
    loader = example_loader(train, base.tokenizer, config, 0)
    plan = client_plan(config, len(train))
    with (
        pytest.raises(ConfigError, match="DoRA"),
        private_training(model, optimizer, loader, plan, [], config.task),
    ):
        pass
    assert not hasattr(model, "autograd_grad_sample_hooks")


def test_private_fed_sb_estimate_without_noise_or_clipping_is_the_plain_estimate():
    """Fed-SB's start under DP: with noise 0, no clipping, no Poisson sampling and full batches
    the private estimate is the plain one (float64, to 1e-10); the steps are counted."""
    n = 40
    config = tiny_config(
        batch_size=n, dp_noise_multiplier=0.0, dp_max_grad_norm=1e6, dp_poisson_sampling=False
    )
    base = load_base_model(config)
    model = base.model.double()
    train = partitioning.client_data(config, 0, 3).train.select(range(n))
    plan = client_plan(config, n)
    loader = example_loader(train, base.tokenizer, config, 0)
    private, history = estimate_private_gradient(
        model, loader, config.target_module_names, 2, plan, [], config.task, CPU
    )
    batches = encoding.batches(train, base.tokenizer, config.max_length, n, seed=0, steps=2)
    plain = estimate_gradient(
        model, lambda m, batch: m(**batch).loss, batches, config.target_module_names
    )
    assert private.keys() == plain.keys() and history == [(0.0, 1.0, 2)]
    for module in plain:
        torch.testing.assert_close(private[module], plain[module], rtol=0, atol=1e-10)
    assert not any(p.requires_grad for p in model.parameters())


# ---- the budget in a real simulation --------------------------------------------------------------
