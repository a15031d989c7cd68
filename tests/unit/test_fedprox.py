"""FedProx's proximal term in local training, against SGD steps worked out by hand."""

import pytest
import torch
from torch import nn

from fedlora.config import RunConfig
from fedlora.errors import ConfigError
from fedlora.method_config import parse_run_config, server_optimizer_of
from fedlora.training.local import train_local


def test_proximal_term_pulls_towards_the_start_by_hand():
    """Loss <w, x> (gradient x); with mu: grad = x + mu (w - w_0). SGD at lr 0.1, two steps."""
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
    x = torch.tensor([[3.0, 0.5]], dtype=torch.float64)
    batch = {"x": x, "labels": torch.zeros(1)}
    lr, mu = 0.1, 2.0
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    train_local(
        model,
        [batch, batch],
        2,
        lr,
        0.0,
        "cpu",
        optimizer=optimizer,
        loss_fn=lambda m, b: (m.weight * b["x"]).sum(),
        proximal_mu=mu,
    )
    w0 = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    w1 = w0 - lr * x
    w2 = w1 - lr * (x + mu * (w1 - w0))
    torch.testing.assert_close(model.weight.detach(), w2, rtol=0, atol=1e-15)
    assert not torch.allclose(w2, w0 - 2 * lr * x)


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"fedprox-mu": -1.0}, "fedprox-mu"),
        ({"fedprox-mu": 0.1, "dp-sample": True}, "fedprox-mu does not apply with dp-sample"),
        ({"strategy": "fedex", "server-optimizer": "adam"}, "server-\\* options do not apply"),
        ({"strategy": "fedavg", "server-lr": 0.5, "dp-client": True}, "with dp-client"),
        ({"strategy": "fslora", "server-optimizer": "adagrad"}, "server-optimizer"),
        ({"strategy": "fslora", "server-lr": 0.0}, "server-lr"),
    ],
)
def test_bad_fedprox_and_server_optimizer_keys_are_refused(keys, message):
    with pytest.raises(ConfigError, match=message):
        parse_run_config(keys)


def test_server_optimizer_keys_reach_the_options():
    config = RunConfig.from_flower(
        {"strategy": "ffalora", "server-optimizer": "yogi", "server-lr": 0.05, "fedprox-mu": 0.01}
    )
    assert server_optimizer_of(config).kind == "yogi"
    assert server_optimizer_of(config).lr == 0.05
