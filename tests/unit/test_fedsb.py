"""Fed-SB's rule: R_t = sum_i p_i R_i between fixed B and A, checked against brute-force sums."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.errors import ConfigError, InvalidUpdateError
from fedlora.lora.adapter import LoRAFactors, SBCore
from fedlora.lora.client_state import ClientState
from fedlora.lora.lowrank import LowRank
from fedlora.lora.updates import ClientUpdate
from fedlora.rules import make_rule
from fedlora.rules.base import ClientSpec
from fedlora.rules.fedsb import FedSB
from fedlora.wire.messages import (
    SB_A_SUFFIX,
    SB_B_SUFFIX,
    SB_R_SUFFIX,
    VERSION_KEY,
    cores_from_tensors,
    cores_to_tensors,
)

F64 = torch.float64


def orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A rows x cols matrix with orthonormal columns (rows >= cols)."""
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=F64)).Q


def bounded(shape, generator) -> torch.Tensor:
    """Entries of size 0.5..1.5 and random sign, so no client's change is negligible."""
    sign = torch.randint(0, 2, shape, generator=generator).to(F64) * 2 - 1
    return sign * (0.5 + torch.rand(shape, generator=generator, dtype=F64))


def padded(block: torch.Tensor, rank: int) -> torch.Tensor:
    out = torch.zeros(rank, rank, dtype=block.dtype)
    out[: block.shape[0], : block.shape[1]] = block
    return out


def sb_update(client_id, num_examples, cores, capacity) -> ClientUpdate:
    return ClientUpdate(client_id, num_examples, {m: SBCore(R, capacity) for m, R in cores.items()})


def spec_for(state, capacity: int, version: int) -> ClientSpec:
    return ClientSpec(
        ranks=dict.fromkeys(state.modules, capacity),
        scales=dict.fromkeys(state.modules, 1.0),
        version=version,
    )


# ---- the exactness property -----------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_every_client_runs_the_brute_force_ideal_update(data):
    rank = data.draw(st.integers(1, 16), label="r")
    d_out = data.draw(st.integers(rank, 20), label="d_out")
    d_in = d_out if data.draw(st.booleans(), label="square") else data.draw(st.integers(rank, 20))
    clients = data.draw(st.integers(1, 12), label="clients")
    capacities = data.draw(st.lists(st.integers(1, rank), min_size=clients, max_size=clients))
    counts = data.draw(st.lists(st.integers(1, 5000), min_size=clients, max_size=clients))
    held = data.draw(st.lists(st.booleans(), min_size=clients, max_size=clients))
    dtype = data.draw(st.sampled_from([F64, torch.float32]), label="dtype")
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    shapes = {"q": (d_out, d_in), "v": (d_in, d_out)}

    # float64 originals cast to the run's dtype; the brute force uses the cast values in float64
    fixed = {
        m: LowRank(orthonormal(o, rank, generator), orthonormal(i, rank, generator).T).to(dtype)
        for m, (o, i) in shapes.items()
    }
    previous = {
        m: (torch.rand(rank, rank, generator=generator, dtype=F64) * 2 - 1).to(dtype)
        for m in shapes
    }
    rule = FedSB()
    state = rule.init_state_from_factors(fixed, previous)
    updates = []
    for index, (capacity, count) in enumerate(zip(capacities, counts)):
        trained = {
            m: previous[m] + padded(bounded((capacity, capacity), generator), rank).to(dtype)
            for m in shapes
        }
        updates.append(sb_update(f"c{index}", count, trained, capacity))

    result = rule.aggregate(state, updates)

    p = [n / sum(counts) for n in counts]
    tolerance = 1e-10 if dtype == F64 else 1e-5
    for m in shapes:
        B, A, R_prev = (t.to(F64) for t in (fixed[m].U, fixed[m].V, previous[m]))
        W_prev = B @ R_prev @ A
        client_changes = [B @ (u.modules[m].R.to(F64) - R_prev) @ A for u in updates]
        ideal = sum(p_i * dW_i for p_i, dW_i in zip(p, client_changes))
        reference = max(
            float(torch.linalg.matrix_norm(ideal)),
            sum(
                p_i * float(torch.linalg.matrix_norm(dW_i)) for p_i, dW_i in zip(p, client_changes)
            ),
        )
        assert result.reference_norm[m] == pytest.approx(reference, rel=1e-4)
        for update, capacity, holds in zip(updates, capacities, held):
            local = ClientState()
            if holds:
                local = ClientState(
                    adapter={k: LoRAFactors(A=fixed[k].V, B=fixed[k].U, scale=1.0) for k in shapes},
                    cores=dict(previous),
                )
            payload = rule.client_payload(
                result.state, spec_for(result.state, capacity, int(holds))
            )
            stepped = rule.client_step(local, payload)
            error = torch.linalg.matrix_norm(stepped.effective_delta(m).to(F64) - (W_prev + ideal))
            assert float(error) <= tolerance * reference
    assert result.relative_deviation() <= tolerance


# ---- hand-made numbers ----------------------------------------------------------------------------


def hand_state():
    B = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=F64)
    A = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=F64)
    return FedSB().init_state_from_factors({"m": LowRank(B, A)}, {"m": torch.eye(2, dtype=F64)})


def test_hand_made_round():
    # client 1 (1 example, capacity 1) moves R[0,0] by 2; client 2 (3 examples, capacity 2) adds
    # [[0, 1], [1, 0]]: R_t = 1/4 [[3, 0], [0, 1]] + 3/4 [[1, 1], [1, 1]] = [[1.5, .75], [.75, 1]]
    state = hand_state()
    R1 = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=F64)
    R2 = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=F64)
    result = FedSB().aggregate(
        state, [sb_update("a", 1, {"m": R1}, 1), sb_update("b", 3, {"m": R2}, 2)]
    )
    expected_core = torch.tensor([[1.5, 0.75], [0.75, 1.0]], dtype=F64)
    torch.testing.assert_close(result.state.cores["m"], expected_core, rtol=0, atol=1e-15)
    # B (R_t - I) A by hand: R_t - I = [[.5, .75], [.75, 0]]; (R_t - I) A = [[.5, 1.75], [.75, 1.5]]
    expected_change = torch.tensor([[0.5, 1.75], [0.75, 1.5], [1.25, 3.25]], dtype=F64)
    torch.testing.assert_close(
        result.global_update["m"].dense(), expected_change, rtol=0, atol=1e-14
    )
    torch.testing.assert_close(
        result.ideal_update["m"].dense(), expected_change, rtol=0, atol=1e-14
    )
    assert result.state.version == 1
    # client a's change B [[2, 0], [0, 0]] A = [[2, 4], [0, 0], [2, 4]], norm sqrt(40)
    client_b = torch.tensor([[0.0, 1.0], [1.0, 2.0], [1.0, 3.0]], dtype=F64)
    expected_reference = max(
        float(torch.linalg.matrix_norm(expected_change)),
        0.25 * math.sqrt(40) + 0.75 * float(torch.linalg.matrix_norm(client_b)),
    )
    assert result.reference_norm["m"] == pytest.approx(expected_reference, rel=1e-12)
    assert result.relative_deviation() == pytest.approx(0.0, abs=1e-15)
    # the global model: B R_t A = B A + the change, with B A = [[1, 2], [0, 1], [1, 3]]
    B_A = torch.tensor([[1.0, 2.0], [0.0, 1.0], [1.0, 3.0]], dtype=F64)
    global_delta = FedSB().global_delta(result.state, "m").dense()
    torch.testing.assert_close(global_delta, B_A + expected_change, rtol=0, atol=1e-14)


def test_global_delta_is_B_R_A():
    state = hand_state()
    B, A = state.sb_factors["m"].U, state.sb_factors["m"].V
    torch.testing.assert_close(FedSB().global_delta(state, "m").dense(), B @ A)


def test_head_is_averaged_by_examples():
    state = hand_state()
    R = torch.eye(2, dtype=F64)
    updates = [
        ClientUpdate("a", 1, {"m": SBCore(R, 2)}, head={"w": torch.tensor([4.0], dtype=F64)}),
        ClientUpdate("b", 3, {"m": SBCore(R, 2)}, head={"w": torch.tensor([0.0], dtype=F64)}),
    ]
    result = FedSB().aggregate(state, updates)
    torch.testing.assert_close(result.state.head["w"], torch.tensor([1.0], dtype=F64))


# ---- payload and client step ----------------------------------------------------------------------


def test_payload_sends_fixed_factors_only_to_new_clients():
    rule = FedSB()
    state = hand_state()
    fresh = rule.client_payload(state, spec_for(state, 1, version=0))
    assert set(fresh.adapter) == {"m" + SB_R_SUFFIX, "m" + SB_A_SUFFIX, "m" + SB_B_SUFFIX}
    assert fresh.config == {VERSION_KEY: 0, "rank.m": 1}
    known = rule.client_payload(state, spec_for(state, 2, version=3))
    assert set(known.adapter) == {"m" + SB_R_SUFFIX}
    assert known.tensor_bytes() == 2 * 2 * 8  # r^2 float64s
    assert fresh.tensor_bytes() == (4 + 4 + 6) * 8


def test_client_step_keeps_its_fixed_factors_between_rounds():
    rule = FedSB()
    state = hand_state()
    first = rule.client_step(ClientState(), rule.client_payload(state, spec_for(state, 1, 0)))
    R = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=F64)
    result = rule.aggregate(state, [sb_update("a", 1, {"m": R}, 1)])
    second = rule.client_step(first, rule.client_payload(result.state, spec_for(state, 1, 1)))
    B, A = state.sb_factors["m"].U, state.sb_factors["m"].V
    torch.testing.assert_close(second.effective_delta("m"), B @ R @ A)
    assert second.adapter["m"].scale == 1.0


def test_client_step_without_fixed_factors_is_refused():
    rule = FedSB()
    state = hand_state()
    payload = rule.client_payload(state, spec_for(state, 1, version=2))
    with pytest.raises(InvalidUpdateError, match="no fixed factors"):
        rule.client_step(ClientState(), payload)


@pytest.mark.parametrize("capacity", [0, 3])
def test_payload_refuses_capacity_outside_the_rank(capacity):
    state = hand_state()
    with pytest.raises(InvalidUpdateError, match="capacity"):
        FedSB().client_payload(state, spec_for(state, capacity, 0))


# ---- validation -----------------------------------------------------------------------------------


def test_non_finite_R_is_refused():
    R = torch.eye(2, dtype=F64)
    R[1, 0] = float("nan")
    with pytest.raises(InvalidUpdateError, match="non-finite"):
        FedSB().aggregate(hand_state(), [sb_update("a", 1, {"m": R}, 2)])


def test_R_of_another_rank_is_refused():
    R = torch.eye(3, dtype=F64)
    with pytest.raises(InvalidUpdateError, match="global rank|global R"):
        FedSB().aggregate(hand_state(), [sb_update("a", 1, {"m": R}, 2)])
    with pytest.raises(InvalidUpdateError, match="global R is 2 x 2"):
        FedSB().aggregate(hand_state(), [sb_update("a", 1, {"m": R}, 1)])


def test_other_update_kinds_are_refused():
    factors = LoRAFactors(A=torch.ones(2, 2, dtype=F64), B=torch.ones(3, 2, dtype=F64), scale=1.0)
    with pytest.raises(InvalidUpdateError, match="SBCore"):
        FedSB().aggregate(hand_state(), [ClientUpdate("a", 1, {"m": factors})])


@pytest.mark.parametrize("capacity", [0, 3, None, 1.5])
def test_reply_with_bad_capacity_is_refused(capacity):
    tensors = {"m" + SB_R_SUFFIX: torch.eye(2)}
    config = {} if capacity is None else {"rank.m": capacity}
    with pytest.raises(InvalidUpdateError, match="capacity"):
        cores_from_tensors(tensors, config)


def test_reply_round_trip():
    cores = {"m": SBCore(torch.arange(9.0).reshape(3, 3), 2)}
    back = cores_from_tensors(*cores_to_tensors(cores))
    assert back["m"].rank == 2
    torch.testing.assert_close(back["m"].R, cores["m"].R)


def test_zero_fixed_factor_is_refused():
    fixed = {"m": LowRank(torch.zeros(3, 2), torch.ones(2, 4))}
    with pytest.raises(ConfigError, match="never trains"):
        FedSB().init_state_from_factors(fixed, {"m": torch.eye(2)})


def test_init_from_adapter_starts_at_its_product():
    generator = torch.Generator().manual_seed(0)
    factors = LoRAFactors(
        A=torch.randn(2, 5, generator=generator, dtype=F64),
        B=torch.randn(4, 2, generator=generator, dtype=F64),
        scale=0.5,
    )
    rule = make_rule("fedsb")
    assert isinstance(rule, FedSB) and rule.exact
    state = rule.init_state({"m": factors})
    torch.testing.assert_close(rule.global_delta(state, "m").dense(), 0.5 * factors.B @ factors.A)
