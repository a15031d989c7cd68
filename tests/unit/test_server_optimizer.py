"""Server optimizers against steps worked out by hand (Reddi et al. 2021, Algorithm 2)."""

import math

import pytest
import torch

from fedlora.errors import ConfigError
from fedlora.lora.adapter import LoRAFactors, SBCore
from fedlora.lora.lowrank import LowRank
from fedlora.lora.server_optimizer import ServerOptimizer
from fedlora.lora.updates import ClientUpdate
from fedlora.rules import make_rule


def run(optimizer, deltas, x0=1.0):
    x, moments, path = {"w": torch.tensor([x0], dtype=torch.float64)}, {}, []
    for delta in deltas:
        x, moments = optimizer.step(x, {"w": torch.tensor([delta], dtype=torch.float64)}, moments)
        path.append(float(x["w"]))
    return path


def test_plain_sgd_adds_the_change_and_keeps_no_state():
    x, moments = ServerOptimizer().step({"w": torch.ones(2)}, {"w": torch.full((2,), 0.5)}, {})
    assert x["w"].tolist() == [1.5, 1.5] and moments == {}


def test_fedavgm_by_hand():
    # m1 = 0.5, x1 = 1 + 0.1 * 0.5; m2 = 0.9 * 0.5 - 1 = -0.55, x2 = x1 + 0.1 * -0.55
    path = run(ServerOptimizer("sgd", lr=0.1, momentum=0.9), [0.5, -1.0])
    assert path == pytest.approx([1.05, 1.05 - 0.055], abs=1e-15)


def test_fedadam_by_hand():
    tau, b1, b2, lr = 1e-3, 0.9, 0.99, 0.1
    m1, v1 = 0.1 * 2.0, b2 * tau**2 + 0.01 * 4.0
    x1 = 1.0 + lr * m1 / (math.sqrt(v1) + tau)
    m2, v2 = b1 * m1 + 0.1 * -1.0, b2 * v1 + 0.01 * 1.0
    x2 = x1 + lr * m2 / (math.sqrt(v2) + tau)
    assert run(ServerOptimizer("adam", lr=lr), [2.0, -1.0]) == pytest.approx([x1, x2], abs=1e-14)


def test_fedyogi_by_hand():
    tau, b1, lr = 1e-3, 0.9, 0.1
    m1, v1 = 0.1 * 2.0, tau**2 - 0.01 * 4.0 * math.copysign(1, tau**2 - 4.0)
    x1 = 1.0 + lr * m1 / (math.sqrt(v1) + tau)
    m2, v2 = b1 * m1 + 0.1 * 0.5, v1 - 0.01 * 0.25 * math.copysign(1, v1 - 0.25)
    x2 = x1 + lr * m2 / (math.sqrt(v2) + tau)
    assert run(ServerOptimizer("yogi", lr=lr), [2.0, 0.5]) == pytest.approx([x1, x2], abs=1e-14)


@pytest.mark.parametrize(
    "options",
    [
        {"kind": "adagrad"},
        {"lr": 0.0},
        {"lr": math.inf},
        {"momentum": 1.0},
        {"beta2": -0.1},
        {"eps": 0.0},
    ],
)
def test_bad_options_are_refused(options):
    with pytest.raises(ConfigError):
        ServerOptimizer(**options)


def lora_round(name, optimizer, seed=0):
    """Round 1 of a rule on two clients of ranks 2 and 4 (top rank 4), plain and with
    ``optimizer``: (state before, plain state after, optimized state after)."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    initial = {"q": LoRAFactors(randn(4, 3), randn(5, 4), 2.0)}
    updates = [
        ClientUpdate(str(i), n, {"q": LoRAFactors(randn(r, 3), randn(5, r), 8.0 / r)})
        for i, (r, n) in enumerate([(2, 10), (4, 30)])
    ]
    plain, stepped = make_rule(name), make_rule(name, server_optimizer=optimizer)
    state = plain.init_state(initial)
    return state, plain.aggregate(state, updates).state, stepped.aggregate(state, updates).state


def test_fedavgm_on_fedavg_factors_by_hand():
    """First step, m = Delta: x_1 = x_0 + 0.5 (average - x_0) for both folded factors."""
    state, plain, stepped = lora_round("fedavg", ServerOptimizer(lr=0.5, momentum=0.9))
    for part in ("U", "V"):
        old, average = getattr(state.factors["q"], part), getattr(plain.factors["q"], part)
        expected = old + 0.5 * (average - old)
        torch.testing.assert_close(
            getattr(stepped.factors["q"], part), expected, rtol=0, atol=1e-14
        )
    assert set(stepped.optimizer) == {"q.U.m", "q.V.m"}


def test_fedadam_on_fedsb_cores_by_hand():
    g = torch.Generator().manual_seed(1)
    fixed = {
        "q": LowRank(
            torch.randn(5, 4, generator=g, dtype=torch.float64),
            torch.randn(4, 3, generator=g, dtype=torch.float64),
        )
    }
    R0 = torch.randn(4, 4, generator=g, dtype=torch.float64)
    updates = []
    for i, capacity in enumerate([2, 4]):
        R = R0.clone()
        R[:capacity, :capacity] += torch.randn(capacity, capacity, generator=g, dtype=torch.float64)
        updates.append(ClientUpdate(str(i), 1, {"q": SBCore(R=R, rank=capacity)}))
    optimizer = ServerOptimizer("adam", lr=0.1)
    state = make_rule("fedsb").init_state_from_factors(fixed, {"q": R0}, {})
    delta = (updates[0].modules["q"].R + updates[1].modules["q"].R) / 2 - R0
    m, v = 0.1 * delta, 0.99 * 1e-6 + 0.01 * delta**2
    expected = R0 + 0.1 * m / (v.sqrt() + 1e-3)
    result = make_rule("fedsb", server_optimizer=optimizer).aggregate(state, updates).state
    torch.testing.assert_close(result.cores["q"], expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", ["fedex", "hetlora", "fedsa"])
def test_rules_whose_update_is_no_weighted_sum_refuse_a_server_optimizer(name):
    with pytest.raises(ConfigError, match="does not take a server optimizer"):
        make_rule(name, server_optimizer=ServerOptimizer("adam"))
