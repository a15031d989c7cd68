"""The files a run's state lives in: a rule's global state as tensors and facts, a node's state
snapshots by round, directories swapped in whole."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from clients.node_store import NodeStore, stored_round
from fedlora.lora.lowrank import LowRank
from fedlora.lora.versioning import ChangeLog
from fedlora.rules.base import GlobalState
from fedlora.run_records.atomic_files import fresh_directory_beside, swap_in_directory


def low_rank(d_out: int, k: int, d_in: int) -> LowRank:
    return LowRank(torch.randn(d_out, k, dtype=torch.float64), torch.randn(k, d_in))


def test_a_global_state_comes_back_identical_from_its_tensors_and_facts():
    shared = low_rank(4, 2, 3)
    state = GlobalState(
        version=2,
        shapes={"m.q": (4, 3), "m.v": (4, 3)},
        factors={"m.q": shared, "m.v": low_rank(4, 2, 3)},
        head={"classifier.weight": torch.randn(5, 4)},
        changes=ChangeLog(
            [
                {"m.q": shared, "m.v": low_rank(4, 1, 3)},
                {"m.q": low_rank(4, 0, 3), "m.v": low_rank(4, 3, 3)},
            ]
        ),
        cores={"m.q": torch.randn(2, 2)},
        sb_factors={"m.q": low_rank(4, 2, 3)},
    )
    tensors, facts = state.state_dict()
    again = GlobalState.from_state_dict({k: t.clone() for k, t in tensors.items()}, facts)
    assert again.version == 2 and again.shapes == state.shapes
    assert again.changes.version == 2
    pairs = [
        *((state.factors[m], again.factors[m]) for m in state.factors),
        *((c[m], a[m]) for c, a in zip(state.changes.rounds, again.changes.rounds) for m in c),
        (state.sb_factors["m.q"], again.sb_factors["m.q"]),
    ]
    for before, after in pairs:
        assert torch.equal(before.U, after.U) and before.U.dtype == after.U.dtype
        assert torch.equal(before.V, after.V)
    assert torch.equal(again.cores["m.q"], state.cores["m.q"])
    assert torch.equal(again.head["classifier.weight"], state.head["classifier.weight"])


def test_a_state_without_base_history_has_none_after_the_round_trip():
    state = GlobalState(version=0, shapes={"m": (2, 2)}, factors={"m": low_rank(2, 1, 2)})
    assert GlobalState.from_state_dict(*state.state_dict()).changes is None


def node_context(state: RecordDict | None = None) -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": 0, "num-partitions": 1},
        state=state or RecordDict(),
        run_config={},
    )


def test_a_fresh_node_goes_on_from_its_snapshot_of_the_round_the_server_resumes_at(tmp_path):
    store = NodeStore(tmp_path, keep=5)
    context = node_context()
    for server_round in (1, 2, 3):
        context.state["fedlora.kept"] = ArrayRecord({"B": torch.full((2, 2), float(server_round))})
        context.state["fedlora.node"] = ConfigRecord({"version": server_round})
        context.state["fedlora.empty"] = ArrayRecord({})
        store.after(context, server_round)
    assert store.rounds() == [1, 2, 3]

    resumed = node_context()  # a new run: the server resumes after round 2
    store.before(resumed, newest=2)
    assert stored_round(resumed) == 2 and store.rounds() == [1, 2]
    kept = resumed.state.array_records["fedlora.kept"].to_torch_state_dict()
    assert torch.equal(kept["B"], torch.full((2, 2), 2.0))
    assert resumed.state.config_records["fedlora.node"]["version"] == 2
    assert "fedlora.empty" in resumed.state.array_records

    store.before(resumed, newest=2)  # a node up to date keeps its state
    assert stored_round(resumed) == 2
    store.before(resumed, newest=1)  # one ahead of the message goes back
    assert stored_round(resumed) == 1 and store.rounds() == [1]


def test_a_node_keeps_its_newest_snapshots_only(tmp_path):
    store, context = NodeStore(tmp_path, keep=2), node_context()
    for server_round in range(5):
        store.after(context, server_round)
    assert store.rounds() == [3, 4]


def test_a_node_without_snapshots_starts_afresh(tmp_path):
    context = node_context(RecordDict({"fedlora.node": ConfigRecord({"version": 3})}))
    context.state["fedlora.store-round"] = ConfigRecord({"round": 9})
    NodeStore(tmp_path / "none", keep=2).before(context, newest=4)
    assert len(context.state) == 0


def test_a_directory_is_swapped_in_whole(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "model.safetensors").write_text("stale")
    fresh = fresh_directory_beside(target)
    (fresh / "adapter_model.safetensors").write_text("new")
    swap_in_directory(fresh, target)
    assert [p.name for p in target.iterdir()] == ["adapter_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
