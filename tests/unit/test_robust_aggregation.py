"""Robust aggregation: one client sending 10^6 times its update among 10, with and without norm
bounding and robust combinations, against the same rule run on the 9 honest clients alone."""

import math

import pytest
import torch

from fedlora.errors import ConfigError
from fedlora.lora.adapter import LoRAFactors, SBCore, SharedA, TrainedB
from fedlora.lora.lowrank import LowRank
from fedlora.lora.updates import ClientUpdate
from fedlora.rules import RULES, make_rule
from fedlora.rules.base import client_change_norms_per_client
from fedlora.rules.robust import Robustness, robust_padded_rows

DTYPE = torch.float64
SHAPES = {"q": (24, 16), "v": (20, 16)}
RANK, ALPHA, CLIENTS, ATTACK = 4, 8.0, 10, 1e6
LORA_RULES = ("fedavg", "fedex", "flora", "lorafair", "flexlora", "hetlora")
BOUNDED = Robustness(norm_median_multiple=1.0)


def randn(generator, *shape):
    return torch.randn(*shape, generator=generator, dtype=DTYPE)


def lora_federation(name: str, seed: int = 0):
    """The rule's round-0 state (B = 0, as peft starts) and 10 similar clients' updates; client 0
    sends its B times 10^6."""
    generator = torch.Generator().manual_seed(seed)
    scale = ALPHA / RANK
    initial = {
        m: LoRAFactors(
            A=randn(generator, RANK, d_in), B=torch.zeros(d_out, RANK, dtype=DTYPE), scale=scale
        )
        for m, (d_out, d_in) in SHAPES.items()
    }
    common = {m: randn(generator, d_out, RANK) for m, (d_out, _) in SHAPES.items()}
    common_A = {m: 0.2 * randn(generator, RANK, d_in) for m, (_, d_in) in SHAPES.items()}
    state = make_rule(name).init_state(initial)
    updates = []
    for i in range(CLIENTS):
        modules = {}
        for m, start in initial.items():
            B = common[m] + 0.2 * randn(generator, *start.B.shape)
            A = start.A + common_A[m] + 0.05 * randn(generator, *start.A.shape)
            if name == "fedsa":
                modules[m] = SharedA(A=A * (ATTACK if i == 0 else 1), scale=scale)
            elif name == "ffalora":
                modules[m] = TrainedB(B=B * (ATTACK if i == 0 else 1), scale=scale)
            else:
                modules[m] = LoRAFactors(A=A, B=B * (ATTACK if i == 0 else 1), scale=scale)
        updates.append(ClientUpdate(str(i), 100, modules))
    return state, updates


def fedsb_federation(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    initial = {
        m: LoRAFactors(A=randn(generator, RANK, d_in), B=randn(generator, d_out, RANK), scale=1.0)
        for m, (d_out, d_in) in SHAPES.items()
    }
    common = {m: randn(generator, RANK, RANK) for m in SHAPES}
    state = make_rule("fedsb").init_state(initial)
    updates = []
    for i in range(CLIENTS):
        modules = {}
        for m in SHAPES:
            R = state.cores[m] + common[m] + 0.2 * randn(generator, RANK, RANK)
            modules[m] = SBCore(R=R * (ATTACK if i == 0 else 1), rank=RANK)
        updates.append(ClientUpdate(str(i), 100, modules))
    return state, updates


def federation(name: str):
    return fedsb_federation() if name == "fedsb" else lora_federation(name)


def global_change(name, state, result) -> dict[str, torch.Tensor]:
    """The round's change of the global model per module (FedSA-LoRA: of the shared folded A)."""
    if name == "fedsa":
        return {m: result.state.factors[m].V - state.factors[m].V for m in SHAPES}
    return {m: result.global_update[m].dense() for m in SHAPES}


def relative_error_to_honest(name: str, robustness: Robustness) -> float:
    """max over modules of ||G - H||_F / ||H||_F: G with the attacker and these options, H the
    plain rule on the 9 honest clients."""
    state, updates = federation(name)
    honest = global_change(name, state, make_rule(name).aggregate(state, updates[1:]))
    attacked = make_rule(name, robustness=robustness).aggregate(state, updates)
    poisoned = global_change(name, state, attacked)
    return max(
        float(
            torch.linalg.matrix_norm(poisoned[m] - honest[m]) / torch.linalg.matrix_norm(honest[m])
        )
        for m in SHAPES
    )


@pytest.mark.parametrize("name", sorted(n for n, rule in RULES.items() if rule.bounds_norms))
def test_norm_bounding_keeps_every_rule_near_the_honest_update(name):
    assert relative_error_to_honest(name, Robustness()) > 1e3
    assert relative_error_to_honest(name, BOUNDED) < 0.2


@pytest.mark.parametrize("name", ["fedavg", "hetlora", "fedsa", "fedsb"])
@pytest.mark.parametrize("combination", ["median", "trimmed-mean"])
def test_robust_combinations_keep_factor_averaging_rules_near_the_honest_update(name, combination):
    assert relative_error_to_honest(name, Robustness(combination=combination)) < 0.2


def test_a_fixed_bound_caps_every_client_change_at_it():
    state, updates = lora_federation("fedavg")
    rule = make_rule("fedavg", robustness=Robustness(norm_bound=0.5))
    bounded = rule.bounded_updates(state, updates)
    for module in SHAPES:
        norms = client_change_norms_per_client(state.factors[module], bounded, module)
        assert float(norms.max()) <= 0.5 * (1 + 1e-12)
        assert float(norms.max()) > 0.45


def test_flora_bounding_scales_the_change_exactly():
    """FLoRA's clients start from B = 0: shrinking B scales dW_i by c_i exactly."""
    state, updates = lora_federation("flora")
    rule = make_rule("flora", robustness=Robustness(norm_bound=0.5))
    for module in SHAPES:
        norms = client_change_norms_per_client(None, rule.bounded_updates(state, updates), module)
        assert torch.allclose(norms, torch.full_like(norms, 0.5), rtol=1e-9)


def test_fedsb_bounding_scales_the_change_exactly():
    state, updates = fedsb_federation()
    rule = make_rule("fedsb", robustness=Robustness(norm_bound=0.5))
    for update in rule.bounded_updates(state, updates):
        for module, core in update.modules.items():
            fixed = state.sb_factors[module]
            change = fixed.U @ (core.R - state.cores[module]) @ fixed.V
            assert math.isclose(float(torch.linalg.matrix_norm(change)), 0.5, rel_tol=1e-9)


def test_mixed_ranks_combine_only_the_clients_that_cover_a_row():
    rows = [torch.full((2, 3), 1.0), torch.full((4, 3), 5.0), torch.full((4, 3), 7.0)]
    median = robust_padded_rows(rows, 6, "median", 0.0)
    assert torch.equal(median[:2], torch.full((2, 3), 5.0))
    assert torch.equal(median[2:4], torch.full((2, 3), 5.0))  # lower median of {5, 7}
    assert torch.equal(median[4:], torch.zeros(2, 3))
    trimmed = robust_padded_rows(rows, 4, "trimmed-mean", 0.34)
    assert torch.equal(trimmed[:2], torch.full((2, 3), 5.0))


def test_fslora_refuses_norm_bounding():
    """Its clients start from sketched sub-blocks, not from the global slices bounding assumes."""
    with pytest.raises(ConfigError, match="fslora"):
        make_rule("fslora", robustness=BOUNDED)


@pytest.mark.parametrize("name", ["fedex", "flora", "flexlora", "lorafair"])
def test_rules_that_combine_products_refuse_a_factor_median(name):
    with pytest.raises(ConfigError, match="robust-aggregation"):
        make_rule(name, robustness=Robustness(combination="median"))


@pytest.mark.parametrize(
    "options",
    [
        {"norm_bound": -1.0},
        {"norm_median_multiple": math.inf},
        {"combination": "mode"},
        {"trim_fraction": 0.5},
    ],
)
def test_robust_options_out_of_range_are_refused(options):
    with pytest.raises(ConfigError):
        Robustness(**options)


def test_bounding_leaves_the_zero_update_round_at_zero():
    state, updates = lora_federation("fedavg")
    still = [
        ClientUpdate(
            u.client_id,
            u.num_examples,
            {
                m: LoRAFactors(
                    A=state.factors[m].V / math.sqrt(ALPHA / RANK),
                    B=state.factors[m].U / math.sqrt(ALPHA / RANK),
                    scale=ALPHA / RANK,
                )
                for m in SHAPES
            },
        )
        for u in updates
    ]
    result = make_rule("fedavg", robustness=BOUNDED).aggregate(state, still)
    assert all(
        float(torch.linalg.matrix_norm(result.global_update[m].dense())) == 0 for m in SHAPES
    )


def test_factor_deviation_is_measured_on_the_low_rank_update():
    """The honest reference itself is what the rule makes of the honest clients (no dense dW)."""
    state, updates = lora_federation("fedex")
    result = make_rule("fedex").aggregate(state, updates[1:])
    assert isinstance(result.global_update["q"], LowRank)
