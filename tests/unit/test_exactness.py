"""Exact rules: after its client step every client runs with W_{t-1} + the brute-force ideal update."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora.rules import make_rule
from tests.support.rounds import Federation

EXACT = ["fedex", "flora", "ffalora"]

federations = st.fixed_dictionaries(
    {
        "d_out": st.integers(1, 24),
        "d_in": st.integers(1, 24),
        "ranks": st.lists(st.integers(1, 32), min_size=1, max_size=20),
        "rslora": st.booleans(),
        "alpha": st.floats(0.5, 64),
        "seed": st.integers(0, 2**16),
    }
).flatmap(
    lambda f: st.fixed_dictionaries(
        {
            **{k: st.just(v) for k, v in f.items()},
            "counts": st.lists(
                st.integers(1, 1000), min_size=len(f["ranks"]), max_size=len(f["ranks"])
            ),
        }
    )
)


def build(name, f, dtype=torch.float64, **kwargs):
    shapes = {"layer.q": (f["d_out"], f["d_in"]), "layer.v": (f["d_in"], f["d_out"])}
    return Federation(
        make_rule(name),
        shapes,
        f["ranks"],
        f["counts"],
        alpha=f["alpha"],
        rslora=f["rslora"],
        dtype=dtype,
        seed=f["seed"],
        **kwargs,
    )


@pytest.mark.parametrize("name", EXACT)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(f=federations)
def test_every_client_runs_with_the_ideal_update_float64(name, f):
    federation = build(name, f)
    everyone = list(range(len(f["ranks"])))
    for _ in range(2):
        worst = federation.round(everyone)
        assert federation.starts_agree
        assert max(worst.values()) < 1e-10
        assert federation.result.relative_deviation() < 1e-10


@pytest.mark.parametrize("name", EXACT)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(f=federations)
def test_every_client_runs_with_the_ideal_update_float32(name, f):
    federation = build(name, f, dtype=torch.float32)
    worst = federation.round(list(range(len(f["ranks"]))))
    assert max(worst.values()) < 1e-5


@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("shared_cache", [False, True])
def test_clients_that_skipped_rounds_catch_up(name, shared_cache):
    """Sampling half the clients each round: everyone, participant or not, stays exact."""
    f = {
        "d_out": 12,
        "d_in": 7,
        "ranks": [2, 4, 8, 8, 3, 5],
        "counts": [5, 50, 20, 7, 13, 30],
        "alpha": 16.0,
        "rslora": False,
        "seed": 3,
    }
    federation = build(name, f, shared_cache=shared_cache)
    sampler = torch.Generator().manual_seed(0)
    for _ in range(5):
        participants = sorted(torch.randperm(6, generator=sampler)[:3].tolist())
        worst = federation.round(participants)
        assert federation.starts_agree
        assert max(worst.values()) < 1e-10
    assert federation.state.version == 5


def test_fedavg_deviation_is_reported_and_nonzero_with_mixed_ranks():
    f = {
        "d_out": 10,
        "d_in": 6,
        "ranks": [2, 4, 8],
        "counts": [10, 20, 30],
        "alpha": 16.0,
        "rslora": False,
        "seed": 1,
    }
    federation = build("fedavg", f)
    for _ in range(2):
        federation.round([0, 1, 2])
        assert federation.result.relative_deviation() > 1e-3
