"""The padded averages of folded factors, batched over the modules concatenated together, against
one module at a time by hand in float64: mixed ranks and shapes, LEGEND's module subsets, a module
nobody trained, example and per-module weights."""

import pytest
import torch

from fedlora.lora.updates import ClientUpdate, ClientUpdates, example_weights
from fedlora.rules import make_rule
from fedlora.rules.base import padded_averages
from fedlora.rules.hetlora import sparsity_weights
from fedlora.rules.legend import legend_ranks
from tests.support.factors import random_adapter, random_factors

LAYERS = 4
LAYERED = [f"model.layers.{i}.self_attn.{p}" for i in range(LAYERS) for p in "qkv"]
UNTRAINED = "model.norm_adapter"
SHAPES = {m: (6, 5) if m.endswith("v") else (4, 7) for m in LAYERED} | {UNTRAINED: (3, 3)}
TOP = 8
CAPACITIES = [8, 2, 4, 8, 1, 5]
COUNTS = [40, 15, 70, 25, 90, 10]


def legend_updates(generator) -> list[ClientUpdate]:
    """One client per capacity class, on LEGEND's modules and ranks (none trains ``UNTRAINED``)."""
    updates = []
    for i, (capacity, n) in enumerate(zip(CAPACITIES, COUNTS)):
        ranks = legend_ranks(capacity, list(SHAPES), TOP)
        modules = {m: random_factors(generator, SHAPES[m], r) for m, r in ranks.items()}
        updates.append(ClientUpdate(f"c{i}", n, modules))
    return updates


def mixed_rank_updates(generator) -> list[ClientUpdate]:
    """Every client trains every layered module, at ranks that differ by client and module."""
    return [
        ClientUpdate(
            f"c{i}",
            n,
            {
                m: random_factors(generator, SHAPES[m], 1 + (i + j) % TOP)
                for j, m in enumerate(LAYERED)
            },
        )
        for i, n in enumerate(COUNTS)
    ]


def by_hand(updates, weights, module, rank):
    """sum_i w_i pad(sqrt(s_i) B_i), sum_i w_i pad(sqrt(s_i) A_i), one client at a time."""
    d_out, d_in = SHAPES[module]
    U = torch.zeros(d_out, rank, dtype=torch.float64)
    V = torch.zeros(rank, d_in, dtype=torch.float64)
    for update, w in zip(updates, weights.tolist()):
        folded = update.modules[module].folded()
        r = folded.inner_rank
        U[:, :r] += w * folded.U
        V[:r] += w * folded.V
    return U, V


def assert_close(factors, expected):
    U, V = expected
    assert factors.U.shape == U.shape and factors.V.shape == V.shape
    assert torch.allclose(factors.U, U, rtol=0, atol=1e-12)
    assert torch.allclose(factors.V, V, rtol=0, atol=1e-12)


@pytest.mark.parametrize("make_updates", [legend_updates, mixed_rank_updates])
@pytest.mark.parametrize("per_module", [False, True])
def test_every_module_of_every_trainer_set_is_its_own_padded_average(make_updates, per_module):
    g = torch.Generator().manual_seed(0)
    batch = ClientUpdates(make_updates(g))
    ranks = {m: TOP + i % 3 for i, m in enumerate(SHAPES)}
    seen = set()
    for trainers, modules in batch.by_trainers(SHAPES):
        if not trainers:
            assert modules == [UNTRAINED]
            continue
        p = example_weights(trainers)
        weights = (
            {m: torch.rand(len(trainers), generator=g, dtype=torch.float64) for m in modules}
            if per_module
            else p
        )
        averaged = padded_averages(trainers, weights, {m: ranks[m] for m in modules})
        assert set(averaged) == set(modules)
        for module in modules:
            w = weights[module] if per_module else p
            assert_close(averaged[module], by_hand(trainers, w, module, ranks[module]))
        seen |= set(modules)
    assert seen == set(LAYERED)


def state_and_updates(name, make_updates):
    g = torch.Generator().manual_seed(1)
    rule = make_rule(name)
    state = rule.init_state(
        random_adapter(g, SHAPES if name == "legend" else {m: SHAPES[m] for m in LAYERED}, TOP)
    )
    return rule, state, ClientUpdates(make_updates(g))


@pytest.mark.parametrize(
    "name, make_updates",
    [("legend", legend_updates), ("fedavg", mixed_rank_updates), ("hetlora", mixed_rank_updates)],
)
def test_the_rules_average_every_module_as_one_module_alone(name, make_updates):
    rule, state, batch = state_and_updates(name, make_updates)
    weights = example_weights(batch)
    averaged = rule._average_factors(state, batch, weights)
    assert list(averaged) == state.modules
    for module in state.modules:
        trainers = batch.trainers(module)
        if not trainers:
            assert averaged[module] is state.factors[module]
            continue
        w = example_weights(trainers)
        if name == "hetlora":
            w = sparsity_weights(batch, weights, module)
        assert_close(averaged[module], by_hand(trainers, w, module, TOP))
