"""Server optimizers against steps worked out by hand (Reddi et al. 2021, Algorithm 2)."""

import math

import pytest
import torch

from fedlora.errors import ConfigError
from fedlora.server_optimizer import ServerOptimizer


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
