"""HetLoRA: sparsity-weighted padded averaging and local rank self-pruning, checked by hand."""

import math

import pytest
import torch

from fedlora.errors import InvalidUpdateError
from fedlora.lora.adapter import LoRAFactors
from fedlora.lora.updates import ClientUpdate, example_weights
from fedlora.rules import make_rule
from fedlora.rules.hetlora import prune_rank, sparsity_weights

DTYPE = torch.float64


def tensor(rows):
    return torch.tensor(rows, dtype=DTYPE)


def random_factors(generator, d_out, d_in, rank, scale):
    return LoRAFactors(
        A=torch.randn(rank, d_in, generator=generator, dtype=DTYPE),
        B=torch.randn(d_out, rank, generator=generator, dtype=DTYPE),
        scale=scale,
    )


def dense_norm(factors: LoRAFactors) -> float:
    return float(torch.linalg.matrix_norm(factors.scale * factors.B @ factors.A))


def padded_sum(updates, weights, module, rank):
    """sum_i w_i [sqrt(s_i) B_i, 0] and sum_i w_i [sqrt(s_i) A_i; 0], padded by hand."""
    U = torch.zeros(updates[0].modules[module].B.shape[0], rank, dtype=DTYPE)
    V = torch.zeros(rank, updates[0].modules[module].A.shape[1], dtype=DTYPE)
    for update, w in zip(updates, weights):
        f = update.modules[module]
        U[:, : f.rank] += w * math.sqrt(f.scale) * f.B
        V[: f.rank] += w * math.sqrt(f.scale) * f.A
    return U, V


def hand_case():
    """Client a: n = 1, s B A = 2 * 3 e1 e1^T (norm 6); client b: n = 3, s B A = e1 e1^T + 4 e2 e3^T
    (norm sqrt(17)). So w_a = 1/4 * 6 / (1/4 * 6 + 3/4 * sqrt(17)) and w_b = 1 - w_a."""
    a = LoRAFactors(A=tensor([[3.0, 0, 0]]), B=tensor([[1.0], [0]]), scale=2.0)
    b = LoRAFactors(A=tensor([[2.0, 0, 0], [0, 0, 4]]), B=tensor([[1.0, 0], [0, 2]]), scale=0.5)
    initial = {
        "q": LoRAFactors(
            A=torch.zeros(2, 3, dtype=DTYPE), B=torch.zeros(2, 2, dtype=DTYPE), scale=1.0
        )
    }
    return initial, [ClientUpdate("a", 1, {"q": a}), ClientUpdate("b", 3, {"q": b})]


def test_weights_match_the_hand_computation():
    initial, updates = hand_case()
    w_a = 1.5 / (1.5 + 0.75 * math.sqrt(17))
    weights = sparsity_weights(updates, example_weights(updates), "q")
    assert torch.allclose(weights, tensor([w_a, 1 - w_a]), rtol=0, atol=1e-15)
    rule = make_rule("hetlora")
    factors = rule.aggregate(rule.init_state(initial), updates).state.factors["q"]
    U, V = padded_sum(updates, [w_a, 1 - w_a], "q", 2)
    assert torch.allclose(factors.U, U, rtol=0, atol=1e-14)
    assert torch.allclose(factors.V, V, rtol=0, atol=1e-14)


def test_all_zero_products_fall_back_to_example_weights():
    _, updates = hand_case()
    silent = [
        ClientUpdate(
            u.client_id,
            u.num_examples,
            {"q": LoRAFactors(u.modules["q"].A, 0 * u.modules["q"].B, 1.0)},
        )
        for u in updates
    ]
    assert torch.equal(sparsity_weights(silent, example_weights(silent), "q"), tensor([0.25, 0.75]))


SHAPES = {"wide": (3, 8), "tall": (9, 2)}


def federation(seed, top, ranks, counts):
    generator = torch.Generator().manual_seed(seed)
    initial = {m: random_factors(generator, *shape, top, 4.0 / top) for m, shape in SHAPES.items()}
    updates = [
        ClientUpdate(
            str(i),
            n,
            {m: random_factors(generator, *shape, r, 4.0 / r) for m, shape in SHAPES.items()},
        )
        for i, (r, n) in enumerate(zip(ranks, counts))
    ]
    return initial, updates


def test_padded_aggregation_with_mixed_ranks_matches_a_brute_force_sum():
    initial, updates = federation(1, 4, [1, 4, 2, 3], [5, 1, 8, 2])
    rule = make_rule("hetlora")
    result = rule.aggregate(rule.init_state(initial), updates)
    total = sum(u.num_examples for u in updates)
    for module in SHAPES:
        scores = [u.num_examples / total * dense_norm(u.modules[module]) for u in updates]
        weights = [score / sum(scores) for score in scores]
        U, V = padded_sum(updates, weights, module, 4)
        factors = result.state.factors[module]
        assert torch.allclose(factors.U, U, rtol=0, atol=1e-12)
        assert torch.allclose(factors.V, V, rtol=0, atol=1e-12)


def orthogonal_components():
    """Components (in s B A, s = 2) of norms 6, 4 and 0.2 along orthogonal directions.

    Head/tail norms: k = 1: 6 / sqrt(16.04) ~ 4.005; k = 2: sqrt(52) ~ 7.211 / 0.2.
    """
    B = tensor([[3.0, 0, 0], [0, 2, 0], [0, 0, 0.1], [0, 0, 0]])
    A = torch.eye(3, 5, dtype=DTYPE)
    return LoRAFactors(A=A, B=B, scale=2.0)


@pytest.mark.parametrize(
    ("gamma", "min_rank", "rank"),
    [
        (0.05, 1, 2),  # 4.005 >= 0.3 at k = 1; 0.2 < 0.3606 at k = 2
        (0.02, 1, 3),  # 0.2 >= 0.1442 at k = 2: nothing drops
        (0.7, 1, 1),  # 4.005 < 4.2 at k = 1
        (0.7, 2, 2),  # k = 1 is below min_rank
        (0.0, 1, 3),  # gamma = 0 keeps everything
    ],
)
def test_pruning_drops_exactly_the_negligible_tail(gamma, min_rank, rank):
    factors = orthogonal_components()
    pruned = prune_rank(factors, gamma, min_rank=min_rank)
    assert pruned.rank == rank and pruned.scale == factors.scale
    assert torch.equal(pruned.A, factors.A[:rank]) and torch.equal(pruned.B, factors.B[:, :rank])


def test_a_zero_adapter_is_not_pruned():
    zero = LoRAFactors(
        A=torch.zeros(3, 4, dtype=DTYPE), B=torch.zeros(5, 3, dtype=DTYPE), scale=1.0
    )
    assert prune_rank(zero, 0.5).rank == 3


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("gamma", [0.05, 0.3, 1.0])
def test_pruning_matches_a_dense_search(seed, gamma):
    generator = torch.Generator().manual_seed(seed)
    factors = random_factors(generator, 7, 6, 5, 0.5)
    factors = LoRAFactors(
        factors.A, factors.B * torch.logspace(0, -3, 5, dtype=DTYPE), factors.scale
    )
    expected = factors.rank
    for k in range(1, factors.rank):
        head = factors.scale * factors.B[:, :k] @ factors.A[:k]
        tail = factors.scale * factors.B[:, k:] @ factors.A[k:]
        if torch.linalg.matrix_norm(tail) < gamma * torch.linalg.matrix_norm(head):
            expected = k
            break
    assert prune_rank(factors, gamma).rank == expected


def test_a_pruned_client_reports_its_received_rank_and_the_ideal_update_uses_it():
    initial, updates = federation(2, 4, [4, 3], [3, 1])
    received = updates[0]
    pruned = {m: LoRAFactors(f.A[:2], f.B[:, :2], f.scale) for m, f in received.modules.items()}
    updates[0] = ClientUpdate("0", 3, pruned, start_ranks=dict.fromkeys(SHAPES, 4))
    rule = make_rule("hetlora")
    result = rule.aggregate(rule.init_state(initial), updates)
    for module, start in initial.items():
        slices = [start.scale * start.B[:, :r] @ start.A[:r] for r in (4, 3)]
        products = [
            u.modules[module].scale * u.modules[module].B @ u.modules[module].A for u in updates
        ]
        ideal = 0.75 * (products[0] - slices[0]) + 0.25 * (products[1] - slices[1])
        assert torch.allclose(result.ideal_update[module].dense(), ideal, rtol=0, atol=1e-12)
        assert result.state.factors[module].inner_rank == 4


def broken(updates, how):
    first = updates[0]
    if how == "modules":
        changed = ClientUpdate(first.client_id, first.num_examples, {"other": first.modules["q"]})
    elif how == "nan":
        f = first.modules["q"]
        changed = ClientUpdate(
            first.client_id, first.num_examples, {"q": LoRAFactors(f.A, f.B * math.nan, f.scale)}
        )
    else:
        changed = ClientUpdate(first.client_id, -2, first.modules)
    return [changed, *updates[1:]]


@pytest.mark.parametrize("how", ["modules", "nan", "examples"])
def test_bad_input_is_refused(how):
    initial, updates = hand_case()
    rule = make_rule("hetlora")
    with pytest.raises(InvalidUpdateError):
        rule.aggregate(rule.init_state(initial), broken(updates, how))
