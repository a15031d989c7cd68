"""FlexLoRA: the truncated SVD of the averaged products, checked against a dense SVD."""

import math

import pytest
import torch

from fedlora.errors import ConfigError, InvalidUpdateError
from fedlora.lora.adapter import LoRAFactors
from fedlora.lora.client_state import ClientState
from fedlora.lora.updates import ClientUpdate
from fedlora.rules import ClientSpec, make_rule

DTYPE = torch.float64
ALPHA = 8.0


def random_factors(generator, d_out, d_in, rank, scale):
    return LoRAFactors(
        A=torch.randn(rank, d_in, generator=generator, dtype=DTYPE),
        B=torch.randn(d_out, rank, generator=generator, dtype=DTYPE),
        scale=scale,
    )


def federation(seed, shapes, top, ranks, counts):
    generator = torch.Generator().manual_seed(seed)
    initial = {
        m: random_factors(generator, d_out, d_in, top, ALPHA / top)
        for m, (d_out, d_in) in shapes.items()
    }
    updates = [
        ClientUpdate(
            str(i),
            n,
            {
                m: random_factors(generator, d_out, d_in, r, ALPHA / r)
                for m, (d_out, d_in) in shapes.items()
            },
        )
        for i, (r, n) in enumerate(zip(ranks, counts))
    ]
    return initial, updates


def dense_average(updates, module):
    """sum_i p_i s_i B_i A_i, written out densely."""
    total = sum(u.num_examples for u in updates)
    return sum(
        u.num_examples / total * u.modules[module].scale * u.modules[module].B @ u.modules[module].A
        for u in updates
    )


def dense_truncation(matrix, rank):
    P, S, Qh = torch.linalg.svd(matrix, full_matrices=False)
    return P[:, :rank] @ torch.diag(S[:rank]) @ Qh[:rank]


def aggregate(initial, updates, **options):
    rule = make_rule("flexlora", **options)
    return rule, rule.aggregate(rule.init_state(initial), updates)


SHAPES = {"wide": (5, 13), "tall": (11, 4), "square": (7, 7)}


@pytest.mark.parametrize(
    ("ranks", "top"), [([2, 4, 3], 4), ([6, 1], 6), ([1, 1, 1, 1, 1, 1, 1], 4), ([2, 2, 2], 2)]
)
def test_global_product_is_the_dense_truncated_svd(ranks, top):
    initial, updates = federation(1, SHAPES, top, ranks, [7, 3, 5, 2, 9, 4, 1][: len(ranks)])
    _, result = aggregate(initial, updates)
    for module in SHAPES:
        factors = result.state.factors[module]
        assert factors.inner_rank == top
        expected = dense_truncation(dense_average(updates, module), top)
        assert torch.allclose(factors.dense(), expected, rtol=0, atol=1e-10)


def test_the_singular_values_are_split_evenly():
    initial, updates = federation(2, SHAPES, 4, [3, 4], [1, 2])
    _, result = aggregate(initial, updates)
    for module in SHAPES:
        factors = result.state.factors[module]
        S = torch.linalg.svdvals(dense_average(updates, module))[:4]
        assert torch.allclose(factors.U.T @ factors.U, torch.diag(S), rtol=0, atol=1e-10)
        assert torch.allclose(factors.V @ factors.V.T, torch.diag(S), rtol=0, atol=1e-10)


@pytest.mark.parametrize("rank", [1, 2, 3, 4])
def test_a_client_of_rank_r_gets_the_best_rank_r_approximation(rank):
    initial, updates = federation(3, SHAPES, 4, [4, 2, 3], [4, 1, 6])
    rule, result = aggregate(initial, updates)
    scale = ALPHA / math.sqrt(rank)  # any scale: the client divides its own out
    spec = ClientSpec(ranks=dict.fromkeys(SHAPES, rank), scales=dict.fromkeys(SHAPES, scale))
    local = ClientState(
        adapter={
            m: random_factors(torch.Generator(), *shape, rank, scale) for m, shape in SHAPES.items()
        }
    )
    local = rule.client_step(local, rule.client_payload(result.state, spec))
    for module in SHAPES:
        received = local.adapter[module]
        assert received.rank == rank and received.scale == scale
        expected = dense_truncation(dense_average(updates, module), rank)
        assert torch.allclose(received.delta(), expected, rtol=0, atol=1e-10)


def test_fewer_products_than_the_global_rank_are_kept_whole_and_zero_padded():
    initial, updates = federation(4, SHAPES, 8, [1, 2], [1, 1])
    _, result = aggregate(initial, updates)
    for module, (d_out, d_in) in SHAPES.items():
        factors = result.state.factors[module]
        assert factors.U.shape == (d_out, 8) and factors.V.shape == (8, d_in)
        assert torch.allclose(factors.dense(), dense_average(updates, module), rtol=0, atol=1e-10)
        assert (
            torch.count_nonzero(factors.U[:, 3:]) == 0 and torch.count_nonzero(factors.V[3:]) == 0
        )


def test_the_update_is_the_change_of_the_global_product():
    initial, updates = federation(5, SHAPES, 3, [3, 2], [2, 5])
    _, result = aggregate(initial, updates)
    for module, start in initial.items():
        previous = start.scale * start.B @ start.A
        expected = dense_truncation(dense_average(updates, module), 3) - previous
        assert torch.allclose(result.global_update[module].dense(), expected, rtol=0, atol=1e-10)


def broken(updates, how):
    first = updates[0]
    if how == "modules":
        changed = ClientUpdate(
            first.client_id, first.num_examples, {"other": first.modules["wide"]}
        )
    elif how == "nan":
        f = first.modules["wide"]
        changed = ClientUpdate(
            first.client_id,
            first.num_examples,
            {**first.modules, "wide": LoRAFactors(f.A, f.B * math.nan, f.scale)},
        )
    else:
        changed = ClientUpdate(first.client_id, 0, first.modules)
    return [changed, *updates[1:]]


@pytest.mark.parametrize("how", ["modules", "nan", "examples"])
def test_bad_input_is_refused(how):
    initial, updates = federation(6, SHAPES, 2, [2, 1], [1, 1])
    rule = make_rule("flexlora")
    with pytest.raises(InvalidUpdateError):
        rule.aggregate(rule.init_state(initial), broken(updates, how))


@pytest.mark.parametrize(("ranks", "top"), [([8] * 6, 8), ([4, 8, 16] * 4, 16), ([8] * 60, 8)])
def test_the_exact_path_is_the_dense_truncated_svd_past_the_global_rank_plus_32(ranks, top):
    """Total ranks 48, 112 and 480 (past the global rank + 32) on 96 x 80: the default path stays exact."""
    shapes = {"q": (96, 80), "k": (96, 80), "o": (40, 120)}
    initial, updates = federation(7, shapes, top, ranks, list(range(1, len(ranks) + 1)))
    _, result = aggregate(initial, updates, svd="exact")
    for module in shapes:
        expected = dense_truncation(dense_average(updates, module), top)
        assert torch.allclose(result.state.factors[module].dense(), expected, rtol=0, atol=1e-10)


def test_the_randomized_path_misses_exactness_past_the_global_rank_plus_32():
    """The option the exact path replaced: 60 rank-8 clients, excess error measurable but small."""
    shapes = {"q": (96, 80)}
    initial, updates = federation(7, shapes, 8, [8] * 60, list(range(1, 61)))
    _, result = aggregate(initial, updates, svd="randomized")
    expected = dense_truncation(dense_average(updates, "q"), 8)
    assert not torch.allclose(result.state.factors["q"].dense(), expected, rtol=0, atol=1e-10)


def test_auto_takes_the_exact_path_up_to_four_sketch_widths():
    rule = make_rule("flexlora")
    assert rule.svd == "auto"
    assert rule.exact_path(4 * (8 + 32), 8) and not rule.exact_path(4 * (8 + 32) + 1, 8)
    assert make_rule("flexlora", svd="exact").exact_path(10_000, 8)
    assert not make_rule("flexlora", svd="randomized").exact_path(8, 8)


def test_an_unknown_svd_path_is_refused():
    with pytest.raises(ConfigError, match="svd"):
        make_rule("flexlora", svd="dense")


def test_a_stack_wider_than_the_sketch_is_near_the_optimal_truncation():
    """Randomized path, 60 clients of rank 8 (inner rank 480) on 96 x 80: subspace iteration's
    excess error is tiny."""
    shapes = {"q": (96, 80)}
    initial, updates = federation(6, shapes, 8, [8] * 60, list(range(1, 61)))
    _, result = aggregate(initial, updates, svd="randomized")
    target = dense_average(updates, "q")
    optimal = torch.linalg.matrix_norm(target - dense_truncation(target, 8))
    achieved = torch.linalg.matrix_norm(target - result.state.factors["q"].dense())
    assert optimal <= achieved <= optimal * (1 + 1e-3)


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_zero_products_give_zero_factors(svd):
    """Every B_i = 0: the sketch of the randomized path is zero, and its orthonormalisation falls
    back to the shifted Cholesky factor instead of failing."""
    initial, updates = federation(8, SHAPES, 2, [2, 1, 2], [1, 2, 3])
    silent = [
        ClientUpdate(
            u.client_id,
            u.num_examples,
            {m: LoRAFactors(f.A, 0 * f.B, f.scale) for m, f in u.modules.items()},
        )
        for u in updates
    ]
    _, result = aggregate(initial, silent, svd=svd)
    for module in SHAPES:
        factors = result.state.factors[module]
        assert torch.count_nonzero(factors.U) == 0 and torch.count_nonzero(factors.V) == 0
