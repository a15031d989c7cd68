"""The server's change log of the drifting base: rounds summed into a dense snapshot where that is
smaller, bounded in size however many rounds pass, and every client version still catches up
exactly."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from fedlora.lora.lowrank import LowRank
from fedlora.lora.versioning import BaseCache, ChangeLog
from fedlora.rules import make_rule
from fedlora.rules.base import GlobalState
from fedlora.wire.messages import Payload
from tests.support.rounds import Federation

SHAPES = {"layer.q": (9, 6), "layer.v": (6, 9)}
ROUNDS, RANK = 30, 2


def random_change(generator: torch.Generator) -> dict[str, LowRank]:
    return {
        module: LowRank(
            torch.randn(d_out, RANK, generator=generator, dtype=torch.float64),
            torch.randn(RANK, d_in, generator=generator, dtype=torch.float64),
        )
        for module, (d_out, d_in) in SHAPES.items()
    }


def stored_numel(log: ChangeLog) -> int:
    factors = sum(delta.numel() for change in log.rounds for delta in change.values())
    return factors + sum(matrix.numel() for matrix in log.snapshot.values())


def test_every_version_catches_up_exactly_and_the_log_stays_bounded():
    generator = torch.Generator().manual_seed(0)
    log, changes = ChangeLog(), []
    dense = sum(d_out * d_in for d_out, d_in in SHAPES.values())
    for _ in range(ROUNDS):
        changes.append(random_change(generator))
        log = log.appended(changes[-1])
        round_numel = sum(delta.numel() for delta in changes[-1].values())
        assert stored_numel(log) <= 2 * dense + round_numel
        for version in range(log.version + 1):
            cache = BaseCache(
                version,
                {
                    m: sum(
                        (c[m].dense() for c in changes[:version]),
                        torch.zeros(SHAPES[m], dtype=torch.float64),
                    )
                    for m in SHAPES
                },
            )
            from_version, change = log.since(version)
            cache.catch_up(
                {m: delta.dense() for m, delta in change.items()}, from_version, log.version
            )
            for module in SHAPES:
                expected = sum(change[module].dense() for change in changes)
                torch.testing.assert_close(cache.shift[module], expected, rtol=0, atol=1e-10)
    assert log.snapshot_version > 0 and len(log.rounds) < ROUNDS
    assert log.since(log.version) == (log.version, {})


def test_a_snapshot_comes_back_identical_from_a_checkpoint():
    generator = torch.Generator().manual_seed(1)
    log = ChangeLog()
    for _ in range(8):
        log = log.appended(random_change(generator))
    assert log.snapshot_version > 0
    state = GlobalState(version=log.version, shapes=SHAPES, changes=log)
    tensors, facts = state.state_dict()
    again = GlobalState.from_state_dict({k: t.clone() for k, t in tensors.items()}, facts).changes
    assert (again.version, again.snapshot_version) == (log.version, log.snapshot_version)
    for module in SHAPES:
        assert torch.equal(again.snapshot[module], log.snapshot[module])
        assert torch.equal(again.total(module).dense(), log.total(module).dense())


@pytest.mark.parametrize("name", ["fedex", "flora"])
def test_a_client_that_missed_many_rounds_catches_up_through_the_snapshot(name):
    federation = Federation(make_rule(name), dict(SHAPES), [2, 4, 3], [10, 30, 20], seed=2)
    federation.round([0, 1, 2])
    behind = copy.deepcopy(federation.caches[0])  # a client's base after round 1
    for _ in range(6):
        federation.round([0, 1, 2])
    assert federation.state.changes.snapshot_version > 1
    spec = dataclasses.replace(federation.spec(0), version=behind.version)
    payload = federation.rule.client_payload(federation.state, spec)
    federation.rule.client_step(copy.deepcopy(federation.locals[0]), payload, behind)
    assert behind.version == federation.caches[0].version == 7
    for module in SHAPES:
        torch.testing.assert_close(
            behind.shift[module], federation.caches[0].shift[module], rtol=0, atol=1e-10
        )


def test_a_cache_keeps_its_shift_on_its_device_and_the_payload_follows():
    """A client's drifted base lives on its device (the meta device stands in for a GPU here),
    whatever device the changes arrive on, and a payload moves there whole."""
    generator = torch.Generator().manual_seed(4)
    change = {m: delta.dense() for m, delta in random_change(generator).items()}
    cache = BaseCache(device=torch.device("meta"))
    cache.catch_up(change, 0, 1)
    cache.catch_up(change, 1, 2)
    assert cache.version == 2
    assert all(shift.device.type == "meta" for shift in cache.shift.values())
    payload = Payload(adapter=dict(change), base_change=dict(change), config={"version": 2})
    moved = payload.to(torch.device("meta"))
    assert all(
        t.device.type == "meta" for t in (*moved.adapter.values(), *moved.base_change.values())
    )
    assert moved.config == payload.config and moved.config is not payload.config
