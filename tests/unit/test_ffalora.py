"""FFA-LoRA: A frozen from the seed and never sent, B averaged exactly, the tail in the base."""

import pytest
import torch

from fedlora.errors import InvalidUpdateError
from fedlora.lora.adapter import LoRAFactors, TrainedB
from fedlora.lora.client_state import ClientState
from fedlora.lora.server_optimizer import ServerOptimizer
from fedlora.lora.updates import ClientUpdate
from fedlora.rules import ClientSpec, make_rule
from fedlora.rules.ffalora import frozen_A
from fedlora.rules.robust import Robustness
from fedlora.wire.messages import B_SUFFIX, B_TAIL_SUFFIX

D_OUT, D_IN, TOP, ALPHA = 6, 5, 4, 8.0


def start(rule, dtype=torch.float64):
    initial = {
        "q": LoRAFactors(
            torch.zeros(TOP, D_IN, dtype=dtype), torch.zeros(D_OUT, TOP, dtype=dtype), ALPHA / TOP
        )
    }
    return rule.init_state(initial)


def spec(rank):
    return ClientSpec({"q": rank}, {"q": ALPHA / rank})


def trained(g, ranks, counts):
    return [
        ClientUpdate(
            str(i),
            n,
            {"q": TrainedB(torch.randn(D_OUT, r, generator=g, dtype=torch.float64), ALPHA / r)},
        )
        for i, (r, n) in enumerate(zip(ranks, counts))
    ]


def test_equal_ranks_average_b():
    g = torch.Generator().manual_seed(0)
    rule = make_rule("ffalora", seed=7)
    updates = trained(g, [TOP] * 3, [10, 30, 60])
    result = rule.aggregate(start(rule), updates)
    B = sum(n / 100 * u.modules["q"].B for u, n in zip(updates, [10, 30, 60]))
    A = frozen_A(7, "q", TOP, D_IN, torch.float64)
    torch.testing.assert_close(
        result.state.factors["q"].dense(), ALPHA / TOP * B @ A, rtol=0, atol=1e-13
    )
    assert result.relative_deviation() < 1e-13


def test_mixed_ranks_hand_computed_columns():
    """Column k of G: the covering clients' s_i B_i[:, k], the others keep G's column."""
    g = torch.Generator().manual_seed(1)
    rule = make_rule("ffalora")
    state = start(rule)
    G0 = torch.randn(D_OUT, TOP, generator=g, dtype=torch.float64)
    state.factors["q"] = type(state.factors["q"])(G0, state.factors["q"].V)
    ranks, counts = [1, 2, 4], [20, 30, 50]
    updates = trained(g, ranks, counts)
    G = rule.aggregate(state, updates).state.factors["q"].U
    for k in range(TOP):
        expected = G0[:, k].clone()
        for u, r, n in zip(updates, ranks, counts):
            if k < r:
                expected += n / 100 * (ALPHA / r * u.modules["q"].B[:, k] - G0[:, k])
        torch.testing.assert_close(G[:, k], expected, rtol=0, atol=1e-13)


def test_only_b_travels_and_the_tail_makes_a_low_rank_client_exact():
    g = torch.Generator().manual_seed(2)
    rule = make_rule("ffalora", seed=3)
    result = rule.aggregate(start(rule), trained(g, [2, 4], [1, 1]))
    payload = rule.client_payload(result.state, spec(2))
    assert set(payload.adapter) == {"q" + B_SUFFIX, "q" + B_TAIL_SUFFIX}
    assert set(rule.client_payload(result.state, spec(TOP)).adapter) == {"q" + B_SUFFIX}
    assert rule.reply_shapes(result.state, {"q": 2}) == {"q" + B_SUFFIX: (D_OUT, 2)}
    local = ClientState(
        adapter={
            "q": LoRAFactors(
                torch.zeros(2, D_IN, dtype=torch.float64),
                torch.zeros(D_OUT, 2, dtype=torch.float64),
                ALPHA / 2,
            )
        }
    )
    stepped = rule.client_step(local, payload)
    torch.testing.assert_close(stepped.adapter["q"].A, frozen_A(3, "q", 2, D_IN, torch.float64))
    W = result.state.factors["q"].dense()
    torch.testing.assert_close(stepped.effective_delta("q"), W, rtol=0, atol=1e-13)
    del payload.adapter["q" + B_TAIL_SUFFIX]
    truncated = rule.client_step(local, payload).effective_delta("q")
    assert torch.linalg.matrix_norm(truncated - W) > 0.1 * torch.linalg.matrix_norm(W)


def test_norm_bounding_shrinks_the_change_exactly():
    g = torch.Generator().manual_seed(4)
    rule = make_rule("ffalora", robustness=Robustness(norm_bound=0.5))
    state = start(rule)
    updates = trained(g, [2], [1])
    A = state.factors["q"].V[:2]
    change = ALPHA / 2 * updates[0].modules["q"].B @ A
    result = rule.aggregate(state, updates)
    expected = 0.5 * change / torch.linalg.matrix_norm(change)
    torch.testing.assert_close(result.state.factors["q"].dense(), expected, rtol=0, atol=1e-13)


def test_bad_updates_are_refused():
    g = torch.Generator().manual_seed(5)
    rule = make_rule("ffalora")
    state = start(rule)
    with pytest.raises(InvalidUpdateError, match="above the global rank"):
        rule.aggregate(state, trained(g, [TOP + 1], [1]))
    wrong = ClientUpdate(
        "0", 1, {"q": TrainedB(torch.randn(D_OUT + 1, 2, dtype=torch.float64), 4.0)}
    )
    with pytest.raises(InvalidUpdateError, match="global shape"):
        rule.aggregate(state, [wrong])
    full = ClientUpdate(
        "0", 1, {"q": LoRAFactors(torch.zeros(2, D_IN), torch.zeros(D_OUT, 2), 4.0)}
    )
    with pytest.raises(InvalidUpdateError, match="TrainedB"):
        rule.aggregate(state, [full])
    nan = ClientUpdate(
        "0", 1, {"q": TrainedB(torch.full((D_OUT, 2), float("nan"), dtype=torch.float64), 4.0)}
    )
    with pytest.raises(InvalidUpdateError, match="non-finite"):
        rule.aggregate(state, [nan])


def test_a_server_optimizer_steps_on_g_and_is_measured():
    """FedAvgM at lr 0.5 (first step, m = Delta): G_1 = G_0 + 0.5 Delta, half the ideal update."""
    g = torch.Generator().manual_seed(6)
    plain, damped = (
        make_rule("ffalora"),
        make_rule("ffalora", server_optimizer=ServerOptimizer(lr=0.5, momentum=0.9)),
    )
    updates = trained(g, [2, 4], [1, 3])
    ideal = plain.aggregate(start(plain), updates).state.factors["q"].U
    result = damped.aggregate(start(damped), updates)
    torch.testing.assert_close(result.state.factors["q"].U, 0.5 * ideal, rtol=0, atol=1e-14)
    assert set(result.state.optimizer) == {"q.m"}
    half_of_ideal = 0.5 * torch.linalg.matrix_norm(ideal @ result.state.factors["q"].V)
    expected = float(half_of_ideal) / result.reference_norm["q"]
    assert result.relative_deviation() == pytest.approx(expected, rel=1e-9)
