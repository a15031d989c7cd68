"""FedEx-LoRA and FLoRA with clients that train different module subsets: each module m is
aggregated over T_m, the clients that trained it (weights p_i / P_m), exactly, against brute-force
float64 sums; a module nobody trained keeps its state; with every client on every module the rules
are what they were."""

import math

import pytest
import torch

from fedlora.lora.client_state import ClientState
from fedlora.lora.updates import ClientUpdate, example_weights
from fedlora.lora.versioning import BaseCache
from fedlora.rules import ClientSpec, make_rule
from fedlora.rules.fedex import FedExLoRA
from fedlora.rules.flora import FLoRA, stack_adapters
from fedlora.rules.reconstruction import pure_client
from tests.support.factors import random_adapter, random_factors

DTYPE = torch.float64
MODULES = ["m0", "m1", "m2", "m3"]
SHAPES = {"m0": (6, 5), "m1": (7, 4), "m2": (5, 8), "m3": (4, 6)}
TOP = 8
# m3 is trained by nobody; m1 by everyone; mixed ranks throughout
SUBSETS = [
    {"m0": 2, "m1": 2},
    {"m1": 4, "m2": 3},
    {"m0": 8, "m1": 6, "m2": 1},
    {"m1": 5},
]
COUNTS = [10, 30, 7, 50]
RULES = ["fedex", "flora"]


def updates_for(generator, subsets, counts=COUNTS):
    return [
        ClientUpdate(
            f"c{i}", n, {m: random_factors(generator, SHAPES[m], r) for m, r in ranks.items()}
        )
        for i, (ranks, n) in enumerate(zip(subsets, counts))
    ]


def spec_of(ranks, version=0):
    return ClientSpec(dict(ranks), {m: 16 / r for m, r in ranks.items()}, version)


def brute_force_change(rule, state, updates, module):
    """sum_{i in T_m} p_i / P_m (s_i B_i A_i - start_i), dense, by hand (None: nobody trained m)."""
    trainers = [u for u in updates if module in u.modules]
    if not trainers:
        return None
    total = sum(u.num_examples for u in trainers)
    change = torch.zeros(SHAPES[module], dtype=DTYPE)
    for u in trainers:
        f = u.modules[module]
        start = torch.zeros_like(change)
        if rule.name == "fedex":
            g = state.factors[module]
            start = g.U[:, : f.rank] @ g.V[: f.rank]
        change += u.num_examples / total * (f.scale * f.B @ f.A - start)
    return change


def client_weights(rule, state, spec) -> dict:
    """W - W_0 per adapted module as a client of ``spec`` runs it after its client step."""
    local = pure_client(state.shapes, spec, DTYPE)
    stepped = rule.client_step(local, rule.client_payload(state, spec), BaseCache())
    return {module: stepped.effective_delta(module) for module in spec.ranks}


@pytest.mark.parametrize("name", RULES)
def test_each_module_is_exact_over_the_clients_that_trained_it(name):
    generator = torch.Generator().manual_seed(0)
    rule = make_rule(name)
    assert rule.allows_module_subsets
    state = rule.init_state(random_adapter(generator, SHAPES, TOP))
    updates = updates_for(generator, SUBSETS)
    result = rule.aggregate(state, updates)
    for module in MODULES:
        before = rule.global_delta(state, module).dense()
        after = rule.global_delta(result.state, module).dense()
        expected = brute_force_change(rule, state, updates, module)
        if expected is None:
            assert torch.count_nonzero(after - before) == 0
            assert result.reference_norm[module] == 0
            continue
        torch.testing.assert_close(after - before, expected, rtol=0, atol=1e-10)
        torch.testing.assert_close(
            result.ideal_update[module].dense(), expected, rtol=0, atol=1e-10
        )
    assert result.relative_deviation() < 1e-10
    # every client, on every module it adapts, runs W_0 + (W_1 - W_0) of that module
    for ranks in [*SUBSETS, {m: TOP for m in MODULES}]:
        for module, delta in client_weights(rule, result.state, spec_of(ranks)).items():
            expected = rule.global_delta(result.state, module).dense()
            torch.testing.assert_close(delta, expected, rtol=0, atol=1e-10)


def test_fedex_averages_factors_over_the_trainers_and_keeps_the_untrained_ones():
    generator = torch.Generator().manual_seed(1)
    rule = make_rule("fedex")
    state = rule.init_state(random_adapter(generator, SHAPES, TOP))
    updates = updates_for(generator, SUBSETS)
    result = rule.aggregate(state, updates)
    for module in MODULES:
        trainers = [u for u in updates if module in u.modules]
        new = result.state.factors[module]
        if not trainers:
            assert torch.equal(new.U, state.factors[module].U)
            assert torch.equal(new.V, state.factors[module].V)
            continue
        total = sum(u.num_examples for u in trainers)
        U = torch.zeros(SHAPES[module][0], TOP, dtype=DTYPE)
        V = torch.zeros(TOP, SHAPES[module][1], dtype=DTYPE)
        for u in trainers:
            f, p = u.modules[module], u.num_examples / total
            U[:, : f.rank] += p * math.sqrt(f.scale) * f.B
            V[: f.rank] += p * math.sqrt(f.scale) * f.A
        torch.testing.assert_close(new.U, U, rtol=0, atol=1e-12)
        torch.testing.assert_close(new.V, V, rtol=0, atol=1e-12)


def test_flora_stacks_the_trainers_only():
    generator = torch.Generator().manual_seed(2)
    rule = make_rule("flora")
    state = rule.init_state(random_adapter(generator, SHAPES, TOP))
    updates = updates_for(generator, SUBSETS)
    change = rule.aggregate(state, updates).state.changes.latest
    for module in MODULES:
        ranks = [u.modules[module].rank for u in updates if module in u.modules]
        assert change[module].inner_rank == (sum(ranks) if ranks else 1)


@pytest.mark.parametrize("name", RULES)
def test_two_rounds_with_changing_subsets_and_a_client_catching_up(name):
    generator = torch.Generator().manual_seed(3)
    rule = make_rule(name)
    state0 = rule.init_state(random_adapter(generator, SHAPES, TOP))
    round1 = updates_for(generator, SUBSETS)
    state1 = rule.aggregate(state0, round1).state
    second = [{"m3": 2, "m0": 4}, {"m1": 8}, {"m2": 2, "m3": 5}]
    round2 = updates_for(generator, second, [4, 9, 6])
    result = rule.aggregate(state1, round2)
    state2 = result.state
    assert result.relative_deviation() < 1e-10
    for module in MODULES:
        total = torch.zeros(SHAPES[module], dtype=DTYPE)
        for state, updates in ((state0, round1), (state1, round2)):
            change = brute_force_change(rule, state, updates, module)
            total += 0 if change is None else change
        torch.testing.assert_close(
            rule.global_delta(state2, module).dense(), total, rtol=0, atol=1e-10
        )
    # a client at version 1 that did not train m3 in round 1 adapts it now: it gets m3's state
    cache = BaseCache()
    spec = spec_of({"m0": 2, "m3": 3})
    local = pure_client(state2.shapes, spec, DTYPE)
    rule.client_step(local, rule.client_payload(state1, spec), cache)
    stepped = rule.client_step(
        local, rule.client_payload(state2, spec_of(spec.ranks, version=1)), cache
    )
    for module in spec.ranks:
        torch.testing.assert_close(
            stepped.effective_delta(module),
            rule.global_delta(state2, module).dense(),
            rtol=0,
            atol=1e-10,
        )


class FedExWithoutSubsets(FedExLoRA):
    allows_module_subsets = False


def test_fedex_with_every_module_trained_is_unchanged():
    generator = torch.Generator().manual_seed(4)
    initial = random_adapter(generator, SHAPES, TOP)
    updates = updates_for(generator, [{m: r for m in MODULES} for r in (2, 8, 5)], [3, 5, 9])
    new, old = make_rule("fedex"), FedExWithoutSubsets()
    got = new.aggregate(new.init_state(initial), updates)
    want = old.aggregate(old.init_state(initial), updates)
    for module in MODULES:
        for a, b in (
            (got.state.factors[module], want.state.factors[module]),
            (got.state.changes.latest[module], want.state.changes.latest[module]),
        ):
            assert torch.equal(a.U, b.U) and torch.equal(a.V, b.V)
        assert got.reference_norm[module] == want.reference_norm[module]
    assert got.relative_deviation() == want.relative_deviation()
    spec = spec_of({m: 5 for m in MODULES})
    got_payload = new.client_payload(got.state, spec)
    want_payload = old.client_payload(want.state, spec)
    assert list(got_payload.adapter) == list(want_payload.adapter)
    for key, tensor in got_payload.adapter.items():
        assert torch.equal(torch.as_tensor(tensor), torch.as_tensor(want_payload.adapter[key]))


def test_flora_with_every_module_trained_is_unchanged():
    from fedlora.rules.base import ReferenceNorms

    generator = torch.Generator().manual_seed(5)
    initial = random_adapter(generator, SHAPES, TOP)
    updates = updates_for(generator, [{m: r for m in MODULES} for r in (2, 8, 5)], [3, 5, 9])
    rule = FLoRA()
    result = rule.aggregate(rule.init_state(initial), updates)
    weights = example_weights(updates)
    today = ReferenceNorms(dict.fromkeys(MODULES), updates, weights)
    for module in MODULES:
        want = stack_adapters(updates, weights, module)
        got = result.state.changes.latest[module]
        assert torch.equal(got.U, want.U) and torch.equal(got.V, want.V)
        assert result.reference_norm[module] == today[module]


@pytest.mark.parametrize("name", RULES)
def test_payload_and_reply_shapes_cover_the_adapted_modules(name):
    generator = torch.Generator().manual_seed(6)
    rule = make_rule(name)
    state = rule.init_state(random_adapter(generator, SHAPES, TOP))
    ranks = {"m1": 4, "m2": 3}
    shapes = rule.reply_shapes(state, ranks)
    assert {key.rsplit(".lora_", 1)[0] for key in shapes} == set(ranks)
    payload = rule.client_payload(state, spec_of(ranks))
    if name == "fedex":
        assert {key.rsplit(".lora_", 1)[0] for key in payload.adapter} == set(ranks)
    local = ClientState(
        adapter={m: random_factors(generator, SHAPES[m], r) for m, r in ranks.items()},
    )
    stepped = rule.client_step(local, payload, BaseCache())
    assert set(stepped.adapter) == set(ranks)


@pytest.mark.parametrize("name", RULES)
def test_reply_checks_take_a_subset_of_the_run_modules(name):
    from fedlora.wire.messages import rank_key
    from strategies.reply_checks import RejectedReply, ReplyChecks

    checks = ReplyChecks(
        rule=make_rule(name),
        lora_alpha=16,
        rslora=False,
        max_examples=10**7,
        top_ranks=dict.fromkeys(MODULES, TOP),
    )
    ranks = {"m1": 4, "m2": 3}
    assert checks._ranks({rank_key(m): r for m, r in ranks.items()}) == ranks
    with pytest.raises(RejectedReply, match="not a non-empty subset"):
        checks._ranks({rank_key("m9"): 2})
