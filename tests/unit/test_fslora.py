"""FSLoRA: sketched sub-blocks only, the server's update by brute force, unbiasedness by Monte Carlo."""

import itertools
import math

import pytest
import torch

from fedlora.errors import InvalidUpdateError
from fedlora.lora.adapter import LoRAFactors
from fedlora.lora.client_state import ClientState
from fedlora.lora.lowrank import LowRank
from fedlora.lora.server_optimizer import ServerOptimizer
from fedlora.lora.updates import ClientUpdate
from fedlora.rules import ClientSpec, GlobalState, make_rule
from fedlora.rules.fslora import FSLoRA, sketch_indices

D_OUT, D_IN, TOP, ALPHA = 5, 4, 4, 8.0
DTYPE = torch.float64


def global_state(rule, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, A = (torch.randn(*s, generator=g, dtype=DTYPE) for s in ((D_OUT, TOP), (TOP, D_IN)))
    return rule.init_state({"q": LoRAFactors(A, B, ALPHA / TOP)})


def spec(client, rank):
    return ClientSpec({"q": rank}, {"q": ALPHA / rank}, client=str(client))


def received(rule, state, client, rank):
    local = ClientState(
        adapter={
            "q": LoRAFactors(
                torch.zeros(rank, D_IN, dtype=DTYPE),
                torch.zeros(D_OUT, rank, dtype=DTYPE),
                ALPHA / rank,
            )
        }
    )
    return rule.client_step(local, rule.client_payload(state, spec(client, rank))).adapter["q"]


def trained_clients(rule, state, ranks, counts, seed):
    """Each client's received sub-block moved by Gaussian noise: (its update, its start)."""
    g = torch.Generator().manual_seed(seed)
    updates, starts = [], []
    for i, r in enumerate(ranks):
        f = received(rule, state, i, r)
        trained = LoRAFactors(
            f.A + torch.randn(f.A.shape, generator=g, dtype=DTYPE),
            f.B + torch.randn(f.B.shape, generator=g, dtype=DTYPE),
            f.scale,
        )
        updates.append(ClientUpdate(str(i), counts[i], {"q": trained}))
        starts.append(f)
    return updates, starts


def gradient_step(factors, G, lr=0.1):
    """One SGD step on the linear loss <G, s B A>: its gradient does not depend on the point."""
    A, B = factors.A.clone().requires_grad_(), factors.B.clone().requires_grad_()
    torch.sum(G * (factors.scale * B @ A)).backward()
    return LoRAFactors(
        A=(A - lr * A.grad).detach(), B=(B - lr * B.grad).detach(), scale=factors.scale
    )


def test_client_receives_and_runs_only_its_scaled_sub_block():
    rule = make_rule("fslora", seed=3)
    state = global_state(rule)
    payload = rule.client_payload(state, spec(7, 2))
    assert payload.adapter["q.lora_A.weight"].shape == (2, D_IN)
    assert payload.adapter["q.lora_B.weight"].shape == (D_OUT, 2)
    index = sketch_indices(3, 0, ["7"], "q", TOP, [2])
    B, A = (
        state.factors["q"].U / math.sqrt(ALPHA / TOP),
        state.factors["q"].V / math.sqrt(ALPHA / TOP),
    )
    sketched = ALPHA / TOP * (TOP / 2) * B[:, index] @ A[index]
    factors = received(rule, state, 7, 2)
    torch.testing.assert_close(factors.delta(), sketched, rtol=0, atol=1e-13)
    torch.testing.assert_close(factors.B, B[:, index], rtol=0, atol=1e-14)


def test_server_update_matches_brute_force_and_unsketched_components_stay():
    rule = make_rule("fslora", seed=1)
    state = global_state(rule)
    ranks, counts = [1, 2, 1], [10, 30, 60]
    updates, _ = trained_clients(rule, state, ranks, counts, seed=5)
    new = rule.aggregate(state, updates).state.factors["q"]
    s = ALPHA / TOP
    B, A = state.factors["q"].U / math.sqrt(s), state.factors["q"].V / math.sqrt(s)
    expected_B, expected_A, touched = B.clone(), A.clone(), set()
    for i, (r, n) in enumerate(zip(ranks, counts)):
        index = sketch_indices(1, 0, [str(i)], "q", TOP, [r]).tolist()
        touched.update(index)
        f = updates[i].modules["q"]
        for column, j in enumerate(index):
            expected_B[:, j] += n / 100 * (f.B[:, column] - B[:, j])
            expected_A[j] += n / 100 * (f.A[column] - A[j])
    torch.testing.assert_close(new.U / math.sqrt(s), expected_B, rtol=0, atol=1e-13)
    torch.testing.assert_close(new.V / math.sqrt(s), expected_A, rtol=0, atol=1e-13)
    untouched = sorted(set(range(TOP)) - touched)
    assert untouched, "the seeds leave a component outside every sketch"
    assert torch.equal(new.U[:, untouched], state.factors["q"].U[:, untouched])


def test_sketches_are_reproducible_and_differ_by_client_round_and_module():
    draw = lambda version, client, module: sketch_indices(
        0, version, [client], module, 16, [4]
    ).tolist()
    assert draw(3, "a", "q") == draw(3, "a", "q")
    assert len({tuple(draw(v, c, m)) for v in range(3) for c in "ab" for m in ("q", "v")}) > 6


def test_a_batch_of_sketches_is_each_client_drawn_alone():
    clients, sizes = ["a", "b", "c", "d"], [1, 16, 5, 5]
    batch = sketch_indices(2, 7, clients, "q", 16, sizes)
    alone = [sketch_indices(2, 7, [c], "q", 16, [m]) for c, m in zip(clients, sizes)]
    assert torch.equal(batch, torch.cat(alone))
    assert alone[1].tolist() == list(range(16))
    for index, size in zip(alone, sizes):
        assert len(set(index.tolist())) == size and index.tolist() == sorted(index.tolist())
    with pytest.raises(InvalidUpdateError, match="sketch of 0 components"):
        sketch_indices(2, 7, ["a"], "q", 16, [0])


def test_reference_norm_and_ideal_update_are_the_clients_changes_by_brute_force():
    """sum_i p_i ||dW_i|| and dW* = sum_i p_i dW_i, dW_i the change of client i's sketched model."""
    rule = make_rule("fslora", seed=4)
    state = global_state(rule)
    ranks, counts = [3, 1, 4], [5, 20, 15]
    updates, starts = trained_clients(rule, state, ranks, counts, seed=6)
    changes = [u.modules["q"].delta() - f.delta() for u, f in zip(updates, starts)]
    result = rule.aggregate(state, updates)
    p = [n / sum(counts) for n in counts]
    expected_norm = sum(w * float(torch.linalg.matrix_norm(c)) for w, c in zip(p, changes))
    assert math.isclose(result.reference_norm["q"], expected_norm, rel_tol=1e-12)
    ideal = sum(w * c for w, c in zip(p, changes))
    torch.testing.assert_close(result.ideal_update["q"].dense(), ideal, rtol=0, atol=1e-12)


def relative(x, y):
    return float(torch.linalg.matrix_norm(x - y) / torch.linalg.matrix_norm(y))


class FixedSketch(FSLoRA):
    """FSLoRA with the sketch given, to average over every subset by brute force."""

    def __init__(self, index):
        super().__init__()
        self.index = index

    def sketches(self, state, clients, module, sizes):
        return torch.tensor(self.index * len(clients))


@pytest.mark.parametrize("capacity", [1, 2, 3])
def test_first_step_averaged_over_every_sketch_is_the_unsketched_step(capacity):
    """E over uniform m-subsets of the aggregated first gradient step (2 clients, linear losses,
    so the gradient does not depend on the point) = the unsketched step: the r/m scaling makes
    the sketch unbiased. Dropping it is biased by m/r, which the same comparison detects."""
    G = [
        torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(i), dtype=DTYPE)
        for i in range(2)
    ]
    counts = [1, 3]
    state = global_state(make_rule("fslora"))

    def step(rule, rank):
        updates = [
            ClientUpdate(str(i), n, {"q": gradient_step(received(rule, state, i, rank), G[i])})
            for i, n in enumerate(counts)
        ]
        new = rule.aggregate(state, updates).state.factors["q"]
        return new.U - state.factors["q"].U, new.V - state.factors["q"].V

    unsketched = step(make_rule("fslora"), TOP)
    subsets = [list(c) for c in itertools.combinations(range(TOP), capacity)]
    steps = [step(FixedSketch(subset), capacity) for subset in subsets]
    for part in range(2):
        mean = sum(s[part] for s in steps) / len(subsets)
        torch.testing.assert_close(mean, unsketched[part], rtol=0, atol=1e-12)
        assert relative(mean * capacity / TOP, unsketched[part]) > 0.2


@pytest.mark.parametrize("capacity", [1, 2])
def test_seeded_sketches_are_uniform_and_the_sketched_model_unbiased_monte_carlo(capacity):
    """Over 2000 seeds: each component is drawn with frequency m/r (within 5 standard errors),
    and the mean sketched model a client runs is U V (brute force) within 10%; without the r/m
    scaling it would be off by 1 - m/r."""
    state, draws = global_state(make_rule("fslora")), 2000
    counts = torch.zeros(TOP)
    mean_model = torch.zeros(D_OUT, D_IN, dtype=DTYPE)
    for seed in range(draws):
        counts[sketch_indices(seed, 0, ["0"], "q", TOP, [capacity])] += 1
        mean_model += received(make_rule("fslora", seed=seed), state, 0, capacity).delta() / draws
    p = capacity / TOP
    assert torch.all((counts / draws - p).abs() < 5 * math.sqrt(p * (1 - p) / draws))
    target = state.factors["q"].dense()
    assert relative(mean_model, target) < 0.1
    assert relative(mean_model * p, target) > 0.3


def test_adam_moments_live_in_the_state_and_survive_a_checkpoint():
    rule = make_rule("fslora", server_optimizer=ServerOptimizer("adam", lr=0.01))
    state = global_state(rule)
    update = lambda s: [
        ClientUpdate(
            "0",
            1,
            {"q": gradient_step(received(rule, s, 0, 2), torch.ones(D_OUT, D_IN, dtype=DTYPE))},
        )
    ]
    first = rule.aggregate(state, update(state)).state
    assert set(first.optimizer) == {"q.U.m", "q.U.v", "q.V.m", "q.V.v"}
    restored = GlobalState.from_state_dict(*first.state_dict())
    a, b = (rule.aggregate(s, update(s)).state.factors["q"] for s in (first, restored))
    assert torch.equal(a.U, b.U) and torch.equal(a.V, b.V)


def test_capacity_above_the_global_rank_is_refused():
    rule = make_rule("fslora")
    with pytest.raises(InvalidUpdateError, match="above the global rank"):
        rule.client_payload(global_state(rule), spec(0, TOP + 1))
    state = global_state(rule)
    too_big = LoRAFactors(
        torch.zeros(TOP + 1, D_IN, dtype=DTYPE), torch.zeros(D_OUT, TOP + 1, dtype=DTYPE), 1.0
    )
    with pytest.raises(InvalidUpdateError, match="above the global rank"):
        rule.aggregate(state, [ClientUpdate("0", 1, {"q": too_big})])
    assert isinstance(state.factors["q"], LowRank)
