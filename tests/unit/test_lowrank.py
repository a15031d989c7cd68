"""Low-rank algebra against dense computations."""

import pytest
import torch

from fedlora.lora.lowrank import (
    LowRank,
    frobenius_norm,
    inner,
    orthonormal_columns,
    pad_cols,
    pad_rows,
    randomized_truncated_svd,
    stack,
)

F64 = torch.float64


def random_lowrank(d_out, d_in, k, seed):
    g = torch.Generator().manual_seed(seed)
    return LowRank(
        torch.randn(d_out, k, generator=g, dtype=F64), torch.randn(k, d_in, generator=g, dtype=F64)
    )


@pytest.mark.parametrize("k", [1, 3, 40])  # 40: the dense route is cheaper for 9 x 7
def test_norm_and_inner_match_dense(k):
    x, y = random_lowrank(9, 7, k, 0), random_lowrank(9, 7, k + 2, 1)
    assert torch.isclose(frobenius_norm(x), torch.linalg.matrix_norm(x.dense()), rtol=1e-12)
    assert torch.isclose(inner(x, y), torch.sum(x.dense() * y.dense()), rtol=1e-12)


def test_stack_is_the_sum_and_padding_keeps_the_product():
    x, y = random_lowrank(5, 4, 2, 0), random_lowrank(5, 4, 3, 1)
    torch.testing.assert_close(stack([x, y]).dense(), x.dense() + y.dense())
    torch.testing.assert_close(pad_cols(x.U, 6) @ pad_rows(x.V, 6), x.dense())
    with pytest.raises(ValueError, match="cannot pad 3 rows down to 2"):
        pad_rows(y.V, 2)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (F64, 1e-14)])
def test_orthonormal_columns_of_an_ill_conditioned_batch(dtype, tolerance):
    g = torch.Generator().manual_seed(0)
    Y = torch.randn(3, 200, 30, generator=g, dtype=dtype) @ torch.diag(
        torch.logspace(0, -6, 30, dtype=dtype)
    )
    Q = orthonormal_columns(Y)
    eye = torch.eye(30, dtype=dtype)
    assert (Q.mT @ Q - eye).abs().max() < tolerance
    assert (
        torch.linalg.matrix_norm(Q @ (Q.mT @ Y) - Y).max() / torch.linalg.matrix_norm(Y).min()
        < tolerance
    )


def test_randomized_svd_is_exact_when_the_sketch_spans_the_stack():
    x = random_lowrank(30, 20, 6, 2)
    P, S, Q = randomized_truncated_svd(x.U[None], x.V[None], rank=4, oversample=2, iterations=1)
    dense_u, dense_s, dense_vh = torch.linalg.svd(x.dense())
    best = dense_u[:, :4] @ torch.diag(dense_s[:4]) @ dense_vh[:4]
    torch.testing.assert_close(S[0], dense_s[:4], rtol=1e-10, atol=0)
    torch.testing.assert_close(P[0] @ torch.diag(S[0]) @ Q[0].T, best, rtol=0, atol=1e-10)
