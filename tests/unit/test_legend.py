"""LEGEND: the depth and rank distribution per capacity class, and the per-module aggregation over
the clients that trained each module, against brute-force float64 sums."""

import math

import pytest
import torch

from fedlora.errors import InvalidUpdateError
from fedlora.lora.updates import ClientUpdate
from fedlora.rules import ClientSpec, make_rule
from fedlora.rules.legend import layer_index, legend_ranks
from tests.support.factors import random_adapter, random_factors

DTYPE = torch.float64
LAYERS = 4
MODULES = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(LAYERS) for p in "qv"]
SHAPES = {m: (6 + i % 3, 5) for i, m in enumerate(MODULES)}
TOP = 8


def client_updates(generator, capacities, counts):
    """One client per capacity class, training the modules and ranks LEGEND gives it."""
    updates = []
    for i, (capacity, n) in enumerate(zip(capacities, counts)):
        ranks = legend_ranks(capacity, MODULES, TOP)
        modules = {m: random_factors(generator, SHAPES[m], r) for m, r in ranks.items()}
        updates.append(ClientUpdate(f"c{i}", n, modules))
    return updates


def test_depth_and_ranks_grow_with_capacity_and_towards_the_output():
    assert legend_ranks(8, MODULES, 8) == {
        m: {3: 8, 2: 6, 1: 4, 0: 2}[layer_index(m)] for m in MODULES
    }
    assert legend_ranks(4, MODULES, 8) == {
        m: {3: 4, 2: 2}[layer_index(m)] for m in MODULES if layer_index(m) >= 2
    }
    assert legend_ranks(1, MODULES, 8) == {m: 1 for m in MODULES if layer_index(m) == 3}
    for small, large in [(1, 2), (2, 4), (4, 8), (3, 5)]:
        low, high = legend_ranks(small, MODULES, 8), legend_ranks(large, MODULES, 8)
        assert set(low) <= set(high) and all(low[m] <= high[m] for m in low)
    with pytest.raises(ValueError, match="capacity 9"):
        legend_ranks(9, MODULES, 8)


def test_a_model_without_numbered_layers_is_one_layer():
    assert legend_ranks(2, ["q", "v"], 8) == {"q": 2, "v": 2}


def brute_force_module(initial, updates, module):
    """Per module over T_m, by hand: p_i / P_m weights, padded folded averages, dW*_m."""
    trainers = [u for u in updates if module in u.modules]
    if not trainers:
        return None
    total = sum(u.num_examples for u in trainers)
    g = initial[module]
    root = math.sqrt(g.scale)
    U = torch.zeros(g.B.shape[0], TOP, dtype=DTYPE)
    V = torch.zeros(TOP, g.A.shape[1], dtype=DTYPE)
    ideal = torch.zeros(g.B.shape[0], g.A.shape[1], dtype=DTYPE)
    for u in trainers:
        p = u.num_examples / total
        f = u.modules[module]
        U[:, : f.rank] += p * math.sqrt(f.scale) * f.B
        V[: f.rank] += p * math.sqrt(f.scale) * f.A
        start = (root * g.B[:, : f.rank]) @ (root * g.A[: f.rank])
        ideal += p * (f.scale * f.B @ f.A - start)
    return U, V, ideal


def test_each_module_is_averaged_over_the_clients_that_trained_it():
    generator = torch.Generator().manual_seed(0)
    initial = random_adapter(generator, SHAPES, TOP)
    rule = make_rule("legend")
    state = rule.init_state(initial)
    updates = client_updates(generator, [2, 4, 8, 4], [10, 30, 7, 50])
    result = rule.aggregate(state, updates)
    for module in MODULES:
        U, V, ideal = brute_force_module(initial, updates, module)
        got = result.state.factors[module]
        torch.testing.assert_close(got.U, U, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.V, V, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(result.ideal_update[module].dense(), ideal)
    # layer 0 is trained by the capacity-8 client alone: it gets weight 1 there
    bottom = MODULES[0]
    solo = updates[2].modules[bottom]
    torch.testing.assert_close(
        result.state.factors[bottom].U[:, : solo.rank], math.sqrt(solo.scale) * solo.B
    )


def test_a_module_nobody_trained_keeps_its_global_state():
    generator = torch.Generator().manual_seed(1)
    initial = random_adapter(generator, SHAPES, TOP)
    rule = make_rule("legend")
    state = rule.init_state(initial)
    updates = client_updates(generator, [2, 4], [10, 30])
    result = rule.aggregate(state, updates)
    untrained = [m for m in MODULES if layer_index(m) < 2]
    assert untrained
    for module in untrained:
        assert torch.equal(result.state.factors[module].U, state.factors[module].U)
        assert torch.equal(result.state.factors[module].V, state.factors[module].V)
        assert result.reference_norm[module] == 0
    deviation = result.relative_deviation()
    assert deviation is not None and math.isfinite(deviation)


def test_with_equal_module_sets_it_is_fedavg():
    generator = torch.Generator().manual_seed(2)
    initial = random_adapter(generator, SHAPES, TOP)
    updates = client_updates(generator, [8, 8, 8], [3, 5, 9])
    legend = make_rule("legend").aggregate(make_rule("legend").init_state(initial), updates)
    fedavg = make_rule("fedavg").aggregate(make_rule("fedavg").init_state(initial), updates)
    for module in MODULES:
        torch.testing.assert_close(legend.state.factors[module].U, fedavg.state.factors[module].U)
        torch.testing.assert_close(legend.state.factors[module].V, fedavg.state.factors[module].V)
    assert legend.relative_deviation() == pytest.approx(fedavg.relative_deviation(), rel=1e-9)


def test_payload_carries_only_the_adapted_modules():
    generator = torch.Generator().manual_seed(3)
    rule = make_rule("legend")
    state = rule.init_state(random_adapter(generator, SHAPES, TOP))
    ranks = legend_ranks(4, MODULES, TOP)
    spec = ClientSpec(ranks, {m: 16 / r for m, r in ranks.items()})
    payload = rule.client_payload(state, spec)
    adapted = {key.rsplit(".lora_", 1)[0] for key in payload.adapter}
    assert adapted == set(ranks)
    assert set(rule.reply_shapes(state, ranks)) == set(payload.adapter)


def test_module_outside_the_global_ones_is_refused():
    generator = torch.Generator().manual_seed(4)
    rule = make_rule("legend")
    state = rule.init_state(random_adapter(generator, SHAPES, TOP))
    updates = client_updates(generator, [2, 4], [10, 30])
    stray = ClientUpdate(
        "c9", 5, {"bert.pooler.dense": random_factors(generator, SHAPES[MODULES[0]], 2)}
    )
    with pytest.raises(InvalidUpdateError, match="does not adapt"):
        rule.aggregate(state, [*updates, stray])
    with pytest.raises(InvalidUpdateError, match="trains no module"):
        rule.aggregate(state, [*updates, ClientUpdate("c8", 5, {})])


def test_rank_above_the_global_rank_is_refused():
    generator = torch.Generator().manual_seed(5)
    rule = make_rule("legend")
    state = rule.init_state(random_adapter(generator, SHAPES, TOP))
    too_big = ClientUpdate(
        "c0", 5, {MODULES[-1]: random_factors(generator, SHAPES[MODULES[-1]], TOP + 1)}
    )
    with pytest.raises(InvalidUpdateError, match="above the global rank"):
        rule.aggregate(state, [too_big])


def test_other_rules_still_refuse_differing_module_sets():
    generator = torch.Generator().manual_seed(6)
    rule = make_rule("fedavg")
    state = rule.init_state(random_adapter(generator, SHAPES, TOP))
    updates = client_updates(generator, [8, 4], [10, 30])
    with pytest.raises(InvalidUpdateError, match="module set differs"):
        rule.aggregate(state, updates)


def test_configurations_outside_legend_are_named():
    rule = make_rule("legend")
    assert rule.rank_refusal(legend_ranks(3, MODULES, TOP), MODULES, TOP) is None
    shallow_but_wide = {m: 8 for m in MODULES if layer_index(m) == 3}
    assert "no LEGEND configuration" in rule.rank_refusal(shallow_but_wide, MODULES, TOP)
    assert make_rule("fedavg").rank_refusal(shallow_but_wide, MODULES, TOP) is None


def test_norm_bounding_runs_per_module_over_its_trainers():
    from fedlora.rules.robust import Robustness

    generator = torch.Generator().manual_seed(7)
    initial = random_adapter(generator, SHAPES, TOP)
    rule = make_rule("legend", robustness=Robustness(norm_median_multiple=1.0))
    updates = client_updates(generator, [2, 4, 8], [10, 30, 7])
    result = rule.aggregate(rule.init_state(initial), updates)
    assert math.isfinite(result.relative_deviation())


def test_reply_checks_name_bad_legend_ranks():
    from fedlora.wire.messages import rank_key
    from strategies.reply_checks import RejectedReply, ReplyChecks

    checks = ReplyChecks(
        rule=make_rule("legend"),
        lora_alpha=16,
        rslora=False,
        max_examples=10**7,
        top_ranks=dict.fromkeys(MODULES, TOP),
    )
    good = legend_ranks(4, MODULES, TOP)
    assert checks._ranks({rank_key(m): r for m, r in good.items()}) == good
    with pytest.raises(RejectedReply, match="no LEGEND configuration"):
        checks._ranks({rank_key(m): TOP for m in good})
    with pytest.raises(RejectedReply, match="not a non-empty subset"):
        checks._ranks({rank_key("bert.pooler.dense"): 2})
