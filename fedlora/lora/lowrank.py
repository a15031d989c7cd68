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

    def to(self, dtype_or_device: torch.dtype | torch.device | str) -> LowRank:
        return LowRank(self.U.to(dtype_or_device), self.V.to(dtype_or_device))


def stack(terms: Sequence[LowRank]) -> LowRank:
    """The sum of low-rank terms as one LowRank: U = [U_1 ... U_K], V = [V_1; ...; V_K]."""
    if not terms:
        raise ValueError("stack needs at least one term")
    return LowRank(torch.cat([t.U for t in terms], dim=1), torch.cat([t.V for t in terms], dim=0))


def frobenius_norm(x: LowRank) -> Tensor:
    """||U V||_F (`frobenius_norms` of one matrix)."""
    return frobenius_norms(x.U, x.V)


GRAM_STRIP = 256
"""Columns per strip of the Gram matrices in `frobenius_norms`."""


def frobenius_norms(U: Tensor, V: Tensor, strip: int = GRAM_STRIP) -> Tensor:
    """||U V||_F of batched factors (U: ... x d_out x k, V: ... x k x d_in), by the cheaper route.
    From the Gram matrices, ||U V||_F^2 = <U^T U, V V^T>: both are symmetric, so only their blocks
    on and above the diagonal are formed, in column strips of width w = min(strip, k), those off
    the diagonal counted twice; about k (k + w) (d_out + d_in) flops. Where the dense product costs
    less (2 d_out d_in k flops), it is formed and summed in row strips of w.
    """
    (d_out, k), d_in = U.shape[-2:], V.shape[-1]
    squared = U.new_zeros(U.shape[:-2])
    if 2 * d_out * d_in < (k + min(strip, k)) * (d_out + d_in):
        for start in range(0, d_out, strip):
            squared += (U[..., start : start + strip, :] @ V).square().sum(dim=(-2, -1))
        return squared.sqrt()
    for start in range(0, k, strip):
        width = min(strip, k - start)
        left = U[..., start : start + width].mT @ U[..., start:]
        right = V[..., start : start + width, :] @ V[..., start:, :].mT
        blocks = left * right
        squared += blocks[..., :width].sum(dim=(-2, -1))
        squared += 2 * blocks[..., width:].sum(dim=(-2, -1))
    return squared.clamp_min(0).sqrt()


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
    """An orthonormal basis of the columns of Y (batched: ... x m x n, m >= n) by shifted Cholesky
    QR3 in float64 (Fukaya et al., 2020): three passes of Y <- Y L^-T, L L^T the Cholesky
    factorisation of Y^T Y + s I. The first pass takes s = 11 (m n + n (n + 1)) u ||Y||_F^2, so
    that it never breaks down, the next two s = 0 wherever the plain factorisation succeeds
    (`cholesky_factor`). The inverse of the small n x n factor is applied by a GEMM: no triangular
    solve on the tall matrix, no host synchronisation. Where Y lacks directions (rank deficiency),
    the columns beyond its rank are round-off directions, orthonormal but spanning nothing of Y,
    or zero where the plain factorisation failed (Y = 0).
    """
    Q = Y.double()
    identity = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    for step in range(3):
        factor = cholesky_factor(Q.mT @ Q, Q.shape[-2], always_shift=step == 0)
        Q = Q @ torch.linalg.solve_triangular(factor, identity, upper=False).mT
    return Q.to(Y.dtype)


def cholesky_factor(gram: Tensor, rows: int, always_shift: bool) -> Tensor:
    """Lower L with L L^T = gram + s I (batched), gram = Y^T Y of a ``rows`` x n matrix Y: s as in
    `orthonormal_columns`, or s = 0 where ``always_shift`` is false and the plain factorisation
    succeeds (chosen per matrix, on the device)."""
    n = gram.shape[-1]
    unit_roundoff = torch.finfo(gram.dtype).eps / 2
    squared_norm = gram.diagonal(dim1=-2, dim2=-1).sum(dim=-1)
    shift = 11 * (rows * n + n * (n + 1)) * unit_roundoff * squared_norm
    shift = (shift + torch.finfo(gram.dtype).tiny)[..., None, None]
    identity = torch.eye(n, dtype=gram.dtype, device=gram.device)
    shifted = torch.linalg.cholesky_ex(gram + shift * identity).L
    if always_shift:
        return shifted
    plain, info = torch.linalg.cholesky_ex(gram)
    return torch.where((info == 0)[..., None, None], plain, shifted)
