"""Low-rank algebra against dense computations."""

import pytest
import torch

from fedlora.lora.lowrank import (
    LowRank,
    frobenius_norm,
    frobenius_norms,
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
def test_norm_matches_dense(k):
    x = random_lowrank(9, 7, k, 0)
    assert torch.isclose(frobenius_norm(x), torch.linalg.matrix_norm(x.dense()), rtol=1e-12)


@pytest.mark.parametrize("k, strip", [(1, 4), (9, 4), (12, 4), (37, 8), (60, 256)])
def test_batched_norms_from_gram_strips_match_dense(k, strip):
    """Strips that divide k, that do not, and k below one strip; 60 x 50 at k = 60 and strip 256
    takes the dense route."""
    g = torch.Generator().manual_seed(k)
    U = torch.randn(3, 60, k, generator=g, dtype=F64)
    V = torch.randn(3, k, 50, generator=g, dtype=F64)
    norms = frobenius_norms(U, V, strip=strip)
    assert norms.shape == (3,)
    torch.testing.assert_close(norms, torch.linalg.matrix_norm(U @ V), rtol=1e-13, atol=0)


def test_batched_norms_of_zero_and_cancelling_factors():
    g = torch.Generator().manual_seed(0)
    U = torch.randn(2, 30, 4, generator=g, dtype=F64)
    V = torch.randn(2, 4, 20, generator=g, dtype=F64)
    U[0] = 0
    V[1, 2:] = -V[1, :2]
    U[1, :, 2:] = U[1, :, :2]  # columns 2, 3 cancel columns 0, 1: U V = 0
    norms = frobenius_norms(U, V, strip=2)
    assert norms[0] == 0  # zero factors: exactly zero
    scale = float(torch.linalg.matrix_norm(U[1]) * torch.linalg.matrix_norm(V[1]))
    assert 0 <= norms[1] <= 1e-7 * scale  # the Gram route rounds: sqrt of ~eps times the scale


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


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (F64, 1e-14)])
def test_orthonormal_columns_of_rank_deficient_and_zero_matrices(dtype, tolerance):
    """One batch: full rank, columns 15..29 repeating 0..14, all zero. The unshifted passes fail on
    the zero matrix alone, which keeps the shifted factor: its columns come out zero; the others'
    are orthonormal and span Y."""
    g = torch.Generator().manual_seed(1)
    Y = torch.randn(3, 200, 30, generator=g, dtype=dtype)
    Y[1, :, 15:] = Y[1, :, :15]
    Y[2] = 0
    Q = orthonormal_columns(Y)
    assert torch.equal(Q[2], torch.zeros_like(Q[2]))
    eye = torch.eye(30, dtype=dtype)
    for full in Q[0], Q[1]:
        assert (full.mT @ full - eye).abs().max() < tolerance
    residual = torch.linalg.matrix_norm(Q[:2] @ (Q[:2].mT @ Y[:2]) - Y[:2])
    assert (residual / torch.linalg.matrix_norm(Y[:2])).max() < tolerance


def test_randomized_svd_is_exact_when_the_sketch_spans_the_stack():
    x = random_lowrank(30, 20, 6, 2)
    P, S, Q = randomized_truncated_svd(x.U[None], x.V[None], rank=4, oversample=2, iterations=1)
    dense_u, dense_s, dense_vh = torch.linalg.svd(x.dense())
    best = dense_u[:, :4] @ torch.diag(dense_s[:4]) @ dense_vh[:4]
    torch.testing.assert_close(S[0], dense_s[:4], rtol=1e-10, atol=0)
    torch.testing.assert_close(P[0] @ torch.diag(S[0]) @ Q[0].T, best, rtol=0, atol=1e-10)
