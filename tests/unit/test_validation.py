"""Bad input gets a clear error naming the problem, and the global state is left as it was."""

import re

import pytest
import torch

from fedlora.errors import InvalidUpdateError
from fedlora.lora.adapter import LoRAFactors
from fedlora.lora.updates import ClientUpdate
from fedlora.lora.versioning import BaseCache, ChangeLog
from fedlora.rules import RULES, ClientSpec, make_rule
from fedlora.wire.messages import adapter_config, adapter_from_tensors, adapter_to_tensors

LORA_RULES = ["fedavg", "fedex", "flora", "lorafair", "flexlora", "hetlora"]


def factors(rank, d_out=6, d_in=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return LoRAFactors(
        torch.randn(rank, d_in, generator=g), torch.randn(d_out, rank, generator=g), 2.0
    )


def initial():
    return {"q": LoRAFactors(torch.randn(4, 4), torch.zeros(6, 4), 2.0)}


def update(client="a", n=10, **modules):
    return ClientUpdate(client, n, modules or {"q": factors(2)})


@pytest.mark.parametrize("name", LORA_RULES)
@pytest.mark.parametrize(
    "bad, message",
    [
        ([update(), update("b", q=factors(2), k=factors(2))], "module set differs"),
        ([update(n=0)], "example count"),
        (
            [update(q=LoRAFactors(torch.full((2, 4), float("nan")), torch.zeros(6, 2), 2.0))],
            "non-finite",
        ),
        ([update(q=factors(2, d_out=5))], "shape"),
        ([update(q=factors(8))], "above the global rank"),
        ([], "no client updates"),
    ],
)
def test_bad_updates_are_refused_by_name(name, bad, message):
    if name == "flora" and "global rank" in message:
        pytest.skip("FLoRA has no global rank: every client's stack is merged as it is")
    rule = make_rule(name)
    if rule.allows_module_subsets and message == "module set differs":
        message = "does not adapt"  # a subset is allowed; a module outside the global ones is not
    state = rule.init_state(initial())
    before = {m: (f.U.clone(), f.V.clone()) for m, f in state.factors.items()}
    with pytest.raises(InvalidUpdateError, match=message):
        rule.aggregate(state, bad)
    for m, (U, V) in before.items():
        assert torch.equal(state.factors[m].U, U) and torch.equal(state.factors[m].V, V)


def test_inf_in_head_is_refused():
    rule = make_rule("fedavg")
    state = rule.init_state(initial(), head={"classifier.weight": torch.zeros(3, 4)})
    good = ClientUpdate("a", 5, {"q": factors(2)}, head={"classifier.weight": torch.zeros(3, 4)})
    bad = ClientUpdate(
        "b", 5, {"q": factors(2)}, head={"classifier.weight": torch.full((3, 4), float("inf"))}
    )
    with pytest.raises(InvalidUpdateError, match="client 'b'.*non-finite.*classifier.weight"):
        rule.aggregate(state, [good, bad])


@pytest.mark.parametrize("name", ["fedavg", "legend", "hetlora"])
@pytest.mark.parametrize(
    "late, message",
    [
        (factors(2, d_out=5), "client 'c': 'q' has shape (5, 4), other clients have (6, 4)"),
        (factors(2, d_in=3), "client 'c': 'q' has shape (6, 3), other clients have (6, 4)"),
        (factors(8), "client 'c': module 'q' has rank 8 above the global rank 4"),
    ],
)
def test_the_first_bad_client_among_good_ones_is_named(name, late, message):
    """Many valid updates are recognised at once (a shape that differs fails the concatenation of
    its group); a bad one is then found and named with its module, as one by one."""
    rule = make_rule(name)
    state = rule.init_state(initial())
    updates = [
        update("a"),
        update("b", q=factors(4, seed=1)),
        update("c", q=late),
        update("d", q=late),
    ]
    with pytest.raises(InvalidUpdateError, match=re.escape(message)):
        rule.aggregate(state, updates)


def test_declared_rank_must_match_the_tensors():
    adapter = {"q": factors(2)}
    config = adapter_config(adapter)
    config["rank.q"] = 3
    with pytest.raises(InvalidUpdateError, match="declared rank 3"):
        adapter_from_tensors(adapter_to_tensors(adapter), config)


def test_missing_lora_B_is_named():
    tensors = adapter_to_tensors({"q": factors(2)})
    del tensors["q.lora_B.weight"]
    with pytest.raises(InvalidUpdateError, match="without both lora_A and lora_B.*'q'"):
        adapter_from_tensors(tensors, adapter_config({"q": factors(2)}))


def test_payload_for_a_rank_above_the_global_rank_is_refused():
    rule = make_rule("fedavg")
    state = rule.init_state(initial())
    with pytest.raises(InvalidUpdateError, match="client rank 9 above the global rank 4"):
        rule.client_payload(state, ClientSpec({"q": 9}, {"q": 1.0}))


def test_unknown_rule_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown aggregation rule 'fedprox'.*fedavg"):
        make_rule("fedprox")
    assert set(RULES) == {
        "fedavg",
        "fedex",
        "flora",
        "fedsa",
        "fedsb",
        "lorafair",
        "flexlora",
        "hetlora",
        "ffalora",
        "fslora",
        "legend",
    }


def test_base_cache_refuses_a_change_that_does_not_start_at_its_version():
    cache = BaseCache()
    cache.catch_up({"q": torch.ones(2, 2)}, from_version=0, to_version=1)
    with pytest.raises(
        InvalidUpdateError, match="starts at version 2 but this cache holds version 1"
    ):
        cache.catch_up({"q": torch.ones(2, 2)}, from_version=2, to_version=3)
    assert cache.version == 1 and torch.equal(cache.shift["q"], torch.ones(2, 2))


def test_a_change_from_version_0_replaces_the_shift_whatever_the_cache_holds():
    cache = BaseCache()
    cache.catch_up({"q": torch.ones(2, 2)}, from_version=0, to_version=1)
    cache.catch_up({"q": torch.full((2, 2), 5.0)}, from_version=0, to_version=4)
    assert cache.version == 4 and torch.equal(cache.shift["q"], torch.full((2, 2), 5.0))


def test_change_log_refuses_a_version_from_the_future():
    with pytest.raises(InvalidUpdateError, match="no base version 3"):
        ChangeLog().since(3)
