"""Low-rank matrices kept as factors, and the linear algebra that never forms a dense product.

A `LowRank` is the product ``U @ V`` with U (d_out x k) and V (k x d_in). Sums of low-rank terms are
built by stacking factors, so that one GEMM per module (``U @ V``) turns a whole sum into a dense
matrix when a dense matrix is wanted, instead of one product per client.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LowRank:
    """The matrix ``U @ V``: U is (d_out x k), V is (k x d_in)."""

    U: Tensor
    V: Tensor

    def __post_init__(self) -> None:
        if self.U.ndim != 2 or self.V.ndim != 2 or self.U.shape[1] != self.V.shape[0]:
            raise ValueError(
                f"LowRank needs U (d_out x k) and V (k x d_in); got {tuple(self.U.shape)} "
                f"and {tuple(self.V.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.U.shape[0], self.V.shape[1])

    @property
    def inner_rank(self) -> int:
        return self.U.shape[1]

    def dense(self) -> Tensor:
        return self.U @ self.V

    def numel(self) -> int:
        """Floats needed to send the factors."""
        return self.U.numel() + self.V.numel()

    def dense_is_smaller(self) -> bool:
        d_out, d_in = self.shape
        return d_out * d_in < self.numel()

    def to(self, dtype: torch.dtype) -> LowRank:
        return LowRank(self.U.to(dtype), self.V.to(dtype))


def stack(terms: Sequence[LowRank]) -> LowRank:
    """The sum of low-rank terms as one LowRank: U = [U_1 ... U_K], V = [V_1; ...; V_K]."""
    if not terms:
        raise ValueError("stack needs at least one term")
    return LowRank(torch.cat([t.U for t in terms], dim=1), torch.cat([t.V for t in terms], dim=0))


def inner(x: LowRank, y: LowRank) -> Tensor:
    """Frobenius inner product <U_x V_x, U_y V_y> = tr((U_x^T U_y)(V_y V_x^T)), from small Grams."""
    return torch.sum((x.U.T @ y.U) * (x.V @ y.V.T))


def frobenius_norm(x: LowRank) -> Tensor:
    """||U V||_F by the cheaper route: the Gram matrices of the factors, k^2 (d_out + d_in) flops, or
    the dense product, d_out d_in k flops (for k above d_out d_in / (d_out + d_in))."""
    (d_out, d_in), k = x.shape, x.inner_rank
    if d_out * d_in < k * (d_out + d_in):
        return torch.linalg.matrix_norm(x.dense())
    return inner(x, x).clamp_min(0).sqrt()


def pad_rows(A: Tensor, rows: int) -> Tensor:
    """A (r x d) zero-padded to (rows x d)."""
    extra = rows - A.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad {A.shape[0]} rows down to {rows}")
    return torch.cat([A, A.new_zeros(extra, A.shape[1])], dim=0) if extra else A


def pad_cols(B: Tensor, cols: int) -> Tensor:
    """B (d x r) zero-padded to (d x cols)."""
    return pad_rows(B.T, cols).T


def exact_truncated_svd(U: Tensor, V: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-``rank`` SVD of the batched products U @ V (U: M x d_out x k, V: M x k x d_in), exact
    for any inner rank k: QR of the factors, U = Q_U R_U and V^T = Q_V R_V (reduced, in float64),
    then the SVD of the small core R_U R_V^T = L diag(S) R^T, so U V = (Q_U L) diag(S) (Q_V R)^T.
    Cost O((d_out + d_in) k^2 + k^3) per module, against O(d_out d_in k) for the dense product.
    Returns (P, S, Q) with U V ~ P diag(S) Q^T, truncated to ``rank``.
    """
    left_basis, left_core = torch.linalg.qr(U.double())
    right_basis, right_core = torch.linalg.qr(V.mT.double())
    left, singular, right_h = torch.linalg.svd(left_core @ right_core.mT)
    rank = min(rank, singular.shape[-1])
    P = left_basis @ left[..., :rank]
    Q = right_basis @ right_h.mT[..., :rank]
    return P.to(U.dtype), singular[..., :rank].to(U.dtype), Q.to(U.dtype)


def randomized_truncated_svd(
    U: Tensor, V: Tensor, rank: int, oversample: int, iterations: int, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-``rank`` SVD of the batched products U @ V (U: M x d_out x k, V: M x k x d_in).

    Randomized subspace iteration on the factors (Halko, Martinsson and Tropp, 2011, Alg. 4.4): a
    seeded Gaussian sketch of width w = rank + oversample, ``iterations`` power steps
    re-orthonormalised by `orthonormal_columns`, then the SVD of the small w x w core (on the CPU, in
    float64). Cost O((d_out + d_in) k w) per step, against O(d_out d_in k) for the dense product.
    Returns (P, S, Q) with U V ~ P diag(S) Q^T.
    """
    width = min(rank + oversample, U.shape[-1], U.shape[-2], V.shape[-1])
    generator = torch.Generator(device=U.device).manual_seed(seed)
    sketch = torch.randn(V.shape[-1], width, generator=generator, device=U.device, dtype=U.dtype)
    basis = orthonormal_columns(U @ (V @ sketch))
    for _ in range(iterations):
        row_basis = orthonormal_columns(V.mT @ (U.mT @ basis))
        basis = orthonormal_columns(U @ (V @ row_basis))
    projected_t = V.mT @ (U.mT @ basis)  # (U V)^T Q: d_in x width
    row_basis = orthonormal_columns(projected_t)
    core = (row_basis.mT @ projected_t).mT  # Q^T U V = core @ row_basis^T, width x width
    left, singular, right_h = torch.linalg.svd(core.double().cpu())
    rank = min(rank, singular.shape[-1])
    left, singular, right = (
        t.to(device=U.device, dtype=U.dtype) for t in (left, singular, right_h.mT)
    )
    return basis @ left[..., :rank], singular[..., :rank], row_basis @ right[..., :rank]


def orthonormal_columns(Y: Tensor) -> Tensor:
    """An orthonormal basis of the columns of Y (batched: ... x m x n, m >= n), by shifted Cholesky
    QR3 in float64 (Fukaya et al., 2020): one Cholesky QR of Y^T Y + s I with
    s = 11 (m n + n (n + 1)) u ||Y||_F^2, then two plain ones. Only GEMMs, batched Cholesky and
    triangular solves, unlike Householder QR, which the GPU runs one matrix at a time. Directions
    that Y lacks (rank deficiency) come out as columns of norm near zero, which span nothing.
    """
    Q = Y.double()
    m, n = Q.shape[-2:]
    unit_roundoff = torch.finfo(torch.float64).eps / 2
    shift = 11 * (m * n + n * (n + 1)) * unit_roundoff * Q.square().sum(dim=(-2, -1))
    identity = torch.eye(n, dtype=Q.dtype, device=Q.device)
    for step in range(3):
        gram = Q.mT @ Q
        if step == 0:
            gram = gram + (shift[..., None, None] + torch.finfo(torch.float64).tiny) * identity
        factor = torch.linalg.cholesky(gram)
        Q = torch.linalg.solve_triangular(factor, Q.mT, upper=False).mT
    return Q.to(Y.dtype)
