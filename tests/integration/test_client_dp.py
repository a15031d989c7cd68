"""Client-level DP (DP-FedAvg): clipping in the client's own shapes, the noise's scale, the
noiseless private aggregate against the rules, the federation's epsilon against a fresh Opacus
accountant, refused strategies, and FedAvg, FedSA-LoRA and Fed-SB federations under DP."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import create_accountant

from clients.app import client_app
from fedlora.config import RunConfig
from fedlora.errors import ConfigError
from fedlora.lora.adapter import LoRAFactors, SBCore, SharedA, TrainedB, lora_scale
from fedlora.lora.lowrank import LowRank
from fedlora.lora.updates import ClientUpdate
from fedlora.method_config import parse_run_config
from fedlora.privacy.client_level import (
    clip_reply,
    own_update,
    private_round,
)
from fedlora.rules import make_rule
from fedlora.wire.messages import (
    A_SUFFIX,
    B_SUFFIX,
)
from strategies import STRATEGIES
from strategies.client_dp import ClientLevelDP
from strategies.server_app import run
from tests.support.client_dp_run import RUN, check_client_level_dp
from tests.support.local_grid import LocalGrid

ALPHA = 16.0
D_OUT, D_IN, TOP = 12, 10, 8


def global_factors(generator: torch.Generator, rank: int = TOP) -> LowRank:
    return LowRank(
        torch.randn(D_OUT, rank, generator=generator, dtype=torch.float64),
        torch.randn(rank, D_IN, generator=generator, dtype=torch.float64),
    )


def fedavg_state(rule, generator: torch.Generator):
    initial = {"m": LoRAFactors.from_folded(global_factors(generator), TOP, ALPHA / TOP)}
    head = {"head.weight": torch.randn(3, D_IN, generator=generator, dtype=torch.float64)}
    return rule.init_state(initial, head)


def trained(state, rank: int, generator: torch.Generator, step: float = 0.1) -> LoRAFactors:
    """A client of ``rank`` that received its slice of the global factors and moved them."""
    start = LoRAFactors.from_folded(state.factors["m"], rank, ALPHA / rank)
    return LoRAFactors(
        A=start.A + step * torch.randn(start.A.shape, generator=generator, dtype=torch.float64),
        B=start.B + step * torch.randn(start.B.shape, generator=generator, dtype=torch.float64),
        scale=start.scale,
    )


# ---- clipping in the client's own shapes --------------------------------------------------------


@pytest.mark.parametrize("rank", [2, 4, 8])
@pytest.mark.parametrize("clip", [0.5, 100.0])
def test_a_client_clips_its_folded_update_in_its_own_shapes(rank, clip):
    """Update: every entry of A moved by 0.01, of B by 0.02, of the head by 0.03; folded (times
    sqrt(s)), its norm is sqrt(s (0.01^2 r d_in + 0.02^2 d_out r) + 0.03^2 * 30) by hand."""
    scale = lora_scale(ALPHA, rank)
    received = {
        "m" + A_SUFFIX: torch.randn(rank, D_IN, dtype=torch.float64),
        "m" + B_SUFFIX: torch.randn(D_OUT, rank, dtype=torch.float64),
        "head.weight": torch.randn(3, D_IN, dtype=torch.float64),
    }
    moves = {"m" + A_SUFFIX: 0.01, "m" + B_SUFFIX: 0.02, "head.weight": 0.03}
    sent = {key: t + moves[key] for key, t in received.items()}
    folds = {"m" + A_SUFFIX: math.sqrt(scale), "m" + B_SUFFIX: math.sqrt(scale)}
    norm = math.sqrt(scale * (0.01**2 * rank * D_IN + 0.02**2 * D_OUT * rank) + 0.03**2 * 3 * D_IN)

    clipped, reported = clip_reply(sent, received, folds, clip)

    assert reported == pytest.approx(norm, rel=1e-12)
    changes = {key: folds.get(key, 1.0) * (clipped[key] - received[key]) for key in sent}
    clipped_norm = math.sqrt(sum(float(c.pow(2).sum()) for c in changes.values()))
    assert clipped_norm == pytest.approx(min(norm, clip), rel=1e-10)
    assert {key: t.shape for key, t in clipped.items()} == {key: t.shape for key, t in sent.items()}
    factor = min(1.0, clip / norm)
    for key in sent:  # the direction is kept
        expected = folds.get(key, 1.0) * moves[key] * factor
        assert torch.allclose(changes[key], torch.full_like(changes[key], expected), atol=1e-12)


def test_the_server_measures_the_update_the_client_clipped():
    """A rank-4 client's clipped reply, read back by the server against the global state, has
    the norm the client clipped it to."""
    generator = torch.Generator().manual_seed(1)
    rule = make_rule("fedavg")
    state = fedavg_state(rule, generator)
    start = LoRAFactors.from_folded(state.factors["m"], 4, ALPHA / 4)
    factors = trained(state, 4, generator)
    head = {"head.weight": state.head["head.weight"] + 0.5}
    sent = {"m" + A_SUFFIX: factors.A, "m" + B_SUFFIX: factors.B, **head}
    received = {"m" + A_SUFFIX: start.A, "m" + B_SUFFIX: start.B, **state.head}
    root = math.sqrt(factors.scale)
    clipped, norm = clip_reply(sent, received, dict.fromkeys(list(sent)[:2], root), 0.3)
    assert norm > 0.3
    update = ClientUpdate(
        "c",
        10,
        {"m": LoRAFactors(clipped["m" + A_SUFFIX], clipped["m" + B_SUFFIX], factors.scale)},
        {"head.weight": clipped["head.weight"]},
    )
    measured = own_update(state, update)
    assert set(measured) == {"m.A", "m.B", "head.weight"}
    assert measured["m.A"].shape == (4, D_IN) and measured["m.B"].shape == (D_OUT, 4)
    total = math.sqrt(sum(float(t.pow(2).sum()) for t in measured.values()))
    assert total == pytest.approx(0.3, rel=1e-10)


# ---- the private aggregate -------------------------------------------------------------------------


def test_the_aggregate_noise_has_std_sigma_c_over_n():
    """Clients that did not move: the new global factors differ from the old by the noise alone,
    std sigma C / n = 1.3 * 0.5 / 4 on each of 2 * 1000 * 8 coordinates (std error 0.5%)."""
    generator = torch.Generator().manual_seed(2)
    rule = make_rule("fedavg")
    factors = LowRank(
        torch.randn(1000, 8, generator=generator, dtype=torch.float64),
        torch.randn(8, 1000, generator=generator, dtype=torch.float64),
    )
    state = rule.init_state({"m": LoRAFactors.from_folded(factors, 8, 2.0)})
    start = LoRAFactors.from_folded(state.factors["m"], 8, 2.0)
    updates = [ClientUpdate(str(i), 5, {"m": start}) for i in range(4)]

    def noise(seed: int) -> torch.Tensor:
        result = private_round(
            rule, state, updates, 4, 0.5, 1.3, torch.Generator().manual_seed(seed)
        ).result
        new = result.state.factors["m"]
        return torch.cat([(new.U - factors.U).flatten(), (new.V - factors.V).flatten()])

    drawn = noise(7)
    std = 1.3 * 0.5 / 4
    assert float(drawn.std()) == pytest.approx(std, rel=0.03)
    assert abs(float(drawn.mean())) < 5 * std / math.sqrt(drawn.numel())
    assert torch.equal(noise(7), drawn)  # seeded
    assert not torch.equal(noise(8), drawn)


def test_a_lost_reply_counts_as_a_zero_update():
    """Two replies of three sampled: the mean divides by 3, not 2."""
    generator = torch.Generator().manual_seed(3)
    rule = make_rule("fedavg")
    state = fedavg_state(rule, generator)
    updates = [ClientUpdate(str(i), 5, {"m": trained(state, 8, generator)}) for i in range(2)]
    result = private_round(rule, state, updates, 3, 1e6, 0.0, generator).result
    deltas = [own_update(state, u)["m.A"] for u in updates]
    expected = state.factors["m"].V + (deltas[0] + deltas[1]) / 3
    assert torch.allclose(result.state.factors["m"].V, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["fedavg", "fedsa"])
def test_noiseless_unclipped_private_round_equals_the_rule_at_equal_ranks(name):
    """Equal ranks, equal example counts (so p_i = 1/n, the DP weighting), sigma 0, C above every
    update: the private aggregate is the rule's own."""
    generator = torch.Generator().manual_seed(4)
    rule = make_rule(name)
    state = fedavg_state(make_rule("fedavg"), generator)
    if name == "fedsa":
        state = rule.init_state({"m": LoRAFactors.from_folded(state.factors["m"], TOP, 2.0)})
    updates = []
    for i in range(3):
        factors = trained(state, TOP, generator)
        if name == "fedsa":
            module, head = SharedA(A=factors.A, scale=factors.scale), {}
        else:
            module = factors
            head = {"head.weight": state.head["head.weight"] + torch.randn(3, D_IN).double()}
        updates.append(ClientUpdate(str(i), 7, {"m": module}, head))
    expected = rule.aggregate(state, updates).state
    private = private_round(rule, state, updates, 3, 1e6, 0.0, generator).result.state
    assert private.version == expected.version == 1
    assert torch.allclose(private.factors["m"].V, expected.factors["m"].V, rtol=0, atol=1e-12)
    assert torch.allclose(private.factors["m"].U, expected.factors["m"].U, rtol=0, atol=1e-12)
    for key in expected.head:
        assert torch.allclose(private.head[key], expected.head[key], rtol=0, atol=1e-12)


def test_noiseless_private_round_equals_fedsb_at_mixed_capacities():
    generator = torch.Generator().manual_seed(5)
    rule = make_rule("fedsb")
    fixed = {"m": global_factors(generator)}
    core = torch.randn(TOP, TOP, generator=generator, dtype=torch.float64)
    head = {"head.weight": torch.randn(3, D_IN, dtype=torch.float64)}
    state = rule.init_state_from_factors(fixed, {"m": core}, head)
    updates = []
    for i, capacity in enumerate([2, 4, 8]):
        R = core.clone()
        R[:capacity, :capacity] += torch.randn(capacity, capacity, dtype=torch.float64)
        moved = {"head.weight": head["head.weight"] + torch.randn(3, D_IN).double()}
        updates.append(ClientUpdate(str(i), 9, {"m": SBCore(R=R, rank=capacity)}, moved))
    expected = rule.aggregate(state, updates).state
    private = private_round(rule, state, updates, 3, 1e6, 0.0, generator).result.state
    assert torch.allclose(private.cores["m"], expected.cores["m"], rtol=0, atol=1e-12)
    assert torch.allclose(private.head["head.weight"], expected.head["head.weight"], atol=1e-12)


def test_noiseless_private_round_equals_ffalora_at_mixed_ranks():
    """FFA-LoRA's aggregate G + sum_i p_i pad(s_i B_i - G[:, :r_i]) is the private mean of the
    updates in its coordinates when the counts are equal, at any ranks."""
    generator = torch.Generator().manual_seed(7)
    rule = make_rule("ffalora")
    state = rule.init_state({"m": LoRAFactors.from_folded(global_factors(generator), TOP, 2.0)})
    updates = [
        ClientUpdate(
            str(i),
            5,
            {
                "m": TrainedB(
                    torch.randn(D_OUT, r, generator=generator, dtype=torch.float64), ALPHA / r
                )
            },
        )
        for i, r in enumerate([2, 4, 8])
    ]
    expected = rule.aggregate(state, updates).state.factors["m"]
    private = private_round(rule, state, updates, 3, 1e6, 0.0, generator).result.state.factors["m"]
    assert torch.allclose(private.U, expected.U, rtol=0, atol=1e-12)
    assert torch.equal(private.V, state.factors["m"].V)


def test_mixed_ranks_add_the_mean_of_the_zero_padded_clipped_updates():
    """Ranks 2, 4, 8, clip 0.4, no noise: X_t = X_{t-1} + (1/3) sum_i pad(clip(u_i)), summed by
    hand, entry by entry."""
    generator = torch.Generator().manual_seed(6)
    rule = make_rule("fedavg")
    state = fedavg_state(rule, generator)
    updates = [
        ClientUpdate(str(r), 5 * r, {"m": trained(state, r, generator)}, dict(state.head))
        for r in (2, 4, 8)
    ]
    result = private_round(rule, state, updates, 3, 0.4, 0.0, generator).result
    U, V = state.factors["m"].U.clone(), state.factors["m"].V.clone()
    for update in updates:
        factors = update.modules["m"]
        r, root = factors.rank, math.sqrt(factors.scale)
        dB = root * factors.B - state.factors["m"].U[:, :r]
        dA = root * factors.A - state.factors["m"].V[:r]
        factor = min(1.0, 0.4 / math.sqrt(float(dB.pow(2).sum() + dA.pow(2).sum())))
        U[:, :r] += factor * dB / 3
        V[:r] += factor * dA / 3
    assert torch.allclose(result.state.factors["m"].U, U, rtol=0, atol=1e-12)
    assert torch.allclose(result.state.factors["m"].V, V, rtol=0, atol=1e-12)
    assert torch.equal(result.state.head["head.weight"], state.head["head.weight"])


def test_noise_is_secret_unless_a_seed_is_given():
    def draw(dp: ClientLevelDP) -> torch.Tensor:
        return torch.randn(8, generator=dp.generator(3))

    assert not torch.equal(draw(ClientLevelDP(1.0, 1.0)), draw(ClientLevelDP(1.0, 1.0)))
    seeded = draw(ClientLevelDP(1.0, 1.0, noise_seed=5))
    assert torch.equal(seeded, draw(ClientLevelDP(1.0, 1.0, noise_seed=5)))


# ---- the federation's accountant ---------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_epsilon_after_k_rounds_equals_a_fresh_opacus_accountant(mechanism):
    """3 of 10 clients sampled each round, sigma 1.1, 4 rounds: epsilon at delta 1e-5 is that of
    a fresh accountant stepped 4 times at q = 0.3."""
    generator = torch.Generator().manual_seed(8)
    rule = make_rule("fedavg")
    state = fedavg_state(rule, generator)
    dp = ClientLevelDP(0.5, 1.1, delta=1e-5, accountant=mechanism, noise_seed=0)
    reported = []
    for server_round in range(1, 5):
        dp.sampled(server_round, 3, 10)
        updates = [ClientUpdate(str(i), 5, {"m": trained(state, 8, generator)}) for i in range(3)]
        result, metrics = dp.aggregate(rule, state, updates, [], server_round)
        state = result.state
        reported.append(metrics["client_dp_epsilon"])
    fresh = create_accountant(mechanism)
    for _ in range(4):
        fresh.step(noise_multiplier=1.1, sample_rate=0.3)
    assert reported[-1] == pytest.approx(fresh.get_epsilon(delta=1e-5), rel=0, abs=1e-6)
    assert reported == sorted(reported) and reported[0] < reported[-1]


# ---- refused strategies ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy", ["fedex", "flora", "flexlora", "lorafair", "hetlora", "fslora"]
)
def test_dp_client_is_refused_for_strategies_that_combine_products(strategy):
    with pytest.raises(ConfigError, match=f"strategy '{strategy}'"):
        parse_run_config({"strategy": strategy, "dp-client": True})
    with pytest.raises(ConfigError, match=f"strategy '{strategy}'"):
        STRATEGIES[strategy](client_dp=ClientLevelDP(1.0, 1.0))
    parse_run_config({"strategy": strategy, "dp-client": False})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("dp-client-clip", 0.0),
        ("dp-client-noise-multiplier", -1.0),
        ("dp-client-delta", 1.0),
        ("dp-client-init-clip", -2.0),
        ("dp-client-noise-seed", -2),
    ],
)
def test_client_dp_values_out_of_range_are_refused_by_name(key, value):
    with pytest.raises(ConfigError, match=key):
        RunConfig.from_flower({"strategy": "fedavg", "dp-client": True, key: value})


# ---- a federation in this process ---------------------------------------------------------------


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("strategy", ["fedavg", "fedsa", "fedsb", "ffalora"])
def test_client_level_dp_federation(strategy, tmp_path):
    """3 nodes of ranks 2, 4, 8 for 2 rounds on the in-process grid (see `check_client_level_dp`)."""
    config = {**RUN, "strategy": strategy}
    grid = LocalGrid(client_app(config), num_nodes=3)
    run(grid, {**config, "run-dir": str(tmp_path)})
    check_client_level_dp(strategy, tmp_path, grid)
