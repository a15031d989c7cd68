"""Every kind of client update through its wire format and back, the rank parser, and the base
store's round files read back into a worker's base."""

from __future__ import annotations

import pytest
import torch

from fedlora.errors import InvalidUpdateError
from fedlora.lora.adapter import LoRAFactors, SBCore, SharedA
from fedlora.lora.lowrank import LowRank
from fedlora.lora.versioning import BaseCache
from fedlora.wire.base_store import catch_up_from_store, discard_changes_after, write_round_change
from fedlora.wire.messages import (
    A_SUFFIX,
    B_SUFFIX,
    SB_R_SUFFIX,
    rank_modules,
    ranks_in,
    update_format,
)

generator = torch.Generator().manual_seed(0)


def random(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator)


UPDATES = {
    "lora": {
        "q": LoRAFactors(A=random(2, 6), B=random(5, 2), scale=8.0),
        "v": LoRAFactors(A=random(4, 6), B=random(5, 4), scale=4.0),
    },
    "shared-a": {"q": SharedA(A=random(3, 6), scale=16 / 3)},
    "sb-core": {"q": SBCore(R=random(4, 4), rank=2)},
}
KEYS = {
    "lora": {"q" + A_SUFFIX, "q" + B_SUFFIX, "v" + A_SUFFIX, "v" + B_SUFFIX},
    "shared-a": {"q" + A_SUFFIX},
    "sb-core": {"q" + SB_R_SUFFIX},
}


@pytest.mark.parametrize("name", sorted(UPDATES))
def test_each_update_kind_travels_and_comes_back_equal(name):
    update = UPDATES[name]
    wire = update_format(type(update["q"]))
    tensors, config = wire.to_tensors(update)
    assert set(tensors) == KEYS[name]
    assert ranks_in(config) == {module: factors.rank for module, factors in update.items()}
    back = wire.from_tensors(tensors, config)
    assert back.keys() == update.keys()
    for module, factors in update.items():
        for field in ("A", "B", "R", "scale", "rank"):
            if hasattr(factors, field):
                expected, got = getattr(factors, field), getattr(back[module], field)
                assert torch.equal(torch.as_tensor(got), torch.as_tensor(expected)), field


def test_a_declared_rank_that_does_not_match_the_tensors_is_refused():
    wire = update_format(SharedA)
    tensors, config = wire.to_tensors(UPDATES["shared-a"])
    with pytest.raises(InvalidUpdateError, match="declared rank 2 does not match"):
        wire.from_tensors(tensors, {**config, "rank.q": 2})


def test_an_update_kind_without_a_format_is_named():
    with pytest.raises(TypeError, match="no wire format for updates of kind LowRank"):
        update_format(LowRank)


def test_ranks_are_read_from_the_rank_keys_only():
    config = {"rank.b.q": 4, "scale.b.q": 2.0, "rank.a.v": "8", "version": 3, "start-rank.a.v": 9}
    assert rank_modules(config) == ["a.v", "b.q"]
    assert ranks_in(config) == {"a.v": 8, "b.q": 4}


def test_the_base_store_round_files_catch_a_worker_up(tmp_path):
    changes = [{"q": LowRank(random(5, 1), random(1, 6))} for _ in range(3)]
    for version, change in enumerate(changes, start=1):
        assert write_round_change(tmp_path, version, change) > 0
    discard_changes_after(tmp_path, 2)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "round-1.safetensors",
        "round-2.safetensors",
    ]
    cache = BaseCache()
    catch_up_from_store(cache, str(tmp_path), 2)
    expected = sum(change["q"].U @ change["q"].V for change in changes[:2])
    assert cache.version == 2
    torch.testing.assert_close(cache.shift["q"], expected)
    with pytest.raises(FileNotFoundError, match="round-3.safetensors is missing"):
        catch_up_from_store(cache, str(tmp_path), 3)
