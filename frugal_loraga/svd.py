"""Top-k singular triplets of a group's gradients, all layers at once.

Randomized SVD (Halko et al. 2011) of each G (m x n, fp32) with a sketch of q = 2k columns and 4 power iterations:
  Q = orth(G Omega)                                   Omega: n x q Gaussian
  repeat 4:  Z = orth(G^T Q),  Q = orth(G Z)
  B = Q^T G (q x n),  B B^T = U_B diag(s^2) U_B^T     so  G ~ (Q U_B) diag(s) (B^T U_B / s)^T
The products with G are cuBLAS GEMMs, one layer at a time. What is left is small (q x q) and the same size for every
layer, so it runs batched over the group: orth(Y) for Y (m x q) is Y W diag(l)^(-1/2) with Y^T Y = W diag(l) W^T, one
batched q x q eigendecomposition in fp64 for all the group's layers. torch.svd_lowrank spends most of its time instead
in a Householder QR of each m x q sketch (about ten cuSOLVER calls a layer, each bound by launch latency) and an SVD of
each q x n matrix. The Gram squares the condition number, so it is formed and decomposed in fp64: directions down to
1e-6 of the largest singular value are kept, and those below (beyond what fp32 gradients resolve) get zero columns.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

POWER_ITERATIONS = 4
RELATIVE_FLOOR = 1e-12  # eigenvalues of a Gram (squared singular values) below this times the largest are dropped


@dataclass
class LayerSVD:
    """Top-k singular triplets of one layer's gradient: G ~ U diag(S) V^T, U (m x k), S (k), V (n x k)."""
    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor


def exact_svd(G: torch.Tensor, k: int) -> LayerSVD:
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    return LayerSVD(U[:, :k], S[:k], Vh[:k].T)


def _top_eigen(grams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors of a batch of symmetric q x q matrices (fp64)."""
    values, vectors = torch.linalg.eigh(grams)
    return values.flip(-1).clamp_min(0), vectors.flip(-1)


def orthonormal_bases(Ys: list[torch.Tensor]) -> list[torch.Tensor]:
    """Orthonormal bases (m_i x q, fp32) of the column spaces of tall matrices Y_i (m_i x q), with one batched
    eigendecomposition of their Grams in fp64: Q = Y W diag(l)^(-1/2), columns of negligible l set to zero."""
    Y64 = [Y.double() for Y in Ys]
    values, vectors = _top_eigen(torch.stack([Y.T @ Y for Y in Y64]))
    kept = values > RELATIVE_FLOOR * values[:, :1]
    scales = torch.where(kept, values.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), 0)
    return [(Y @ (W * s)).float() for Y, W, s in zip(Y64, vectors, scales)]


def randomized_svds(Gs: list[torch.Tensor], k: int) -> list[LayerSVD]:
    """Top-k SVD of each G (m_i x n_i, fp32, with min(m_i, n_i) > 2k), randomized as in the module docstring."""
    q = 2 * k
    Q = orthonormal_bases([G @ torch.randn(G.shape[1], q, device=G.device, dtype=G.dtype) for G in Gs])
    for _ in range(POWER_ITERATIONS):
        Z = orthonormal_bases([G.T @ Qi for G, Qi in zip(Gs, Q)])
        Q = orthonormal_bases([G @ Zi for G, Zi in zip(Gs, Z)])
    Bs = [(Qi.T @ G).double() for G, Qi in zip(Gs, Q)]  # q x n
    values, vectors = _top_eigen(torch.stack([B @ B.T for B in Bs]))
    S = values[:, :k].sqrt()
    inverse = torch.where(S > 0, 1 / S.clamp_min(torch.finfo(torch.float64).tiny), 0)
    return [LayerSVD((Qi.double() @ W[:, :k]).float(), s.float(), (B.T @ (W[:, :k] * inv)).float())
            for Qi, B, W, s, inv in zip(Q, Bs, vectors, S, inverse)]


def top_singular(Gs: dict[str, torch.Tensor], k: int, method: str) -> dict[str, LayerSVD]:
    """Top-k SVD of each gradient: exact (torch.linalg.svd), or lowrank (randomized_svds, all at once) where
    2k < min(m, n) and exact elsewhere. A stack of E gradients (E x m x n, an expert stack's) gives each expert's,
    stacked: U (E x m x k), S (E x k), V (E x n x k)."""
    flat = {(n, e): G[e] for n, G in Gs.items() if G.dim() == 3 for e in range(G.shape[0])}
    flat.update({n: G for n, G in Gs.items() if G.dim() == 2})
    exact = {n for n, G in flat.items() if method == "exact" or 2 * k >= min(G.shape)}
    results = {n: exact_svd(flat[n], k) for n in exact}
    rest = [n for n in flat if n not in exact]
    if rest:
        results.update(zip(rest, randomized_svds([flat[n] for n in rest], k)))
    return {n: stacked([results[n, e] for e in range(G.shape[0])]) if G.dim() == 3 else results[n]
            for n, G in Gs.items()}


def stacked(svds: list[LayerSVD]) -> LayerSVD:
    """The experts' SVDs as one: U (E x m x k), S (E x k), V (E x n x k)."""
    return LayerSVD(*(torch.stack([getattr(svd, f) for svd in svds]) for f in ("U", "S", "V")))
