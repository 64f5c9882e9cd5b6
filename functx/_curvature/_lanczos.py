"""Lanczos iterations of the curvature room.

* :func:`thick_restart_lanczos`: block Lanczos with full reorthogonalisation and thick restarts
  (Wu & Simon 2000; its block form as in Zhou & Saad 2008), behind :func:`functx.curvature.eigsh`.
* :func:`batched_lanczos`: ``num_steps`` plain Lanczos steps from many starting vectors at once
  (one ``(P, K)`` product per step), behind stochastic Lanczos quadrature.

The block iteration keeps the Rayleigh–Ritz matrix ``H = V^T A V`` of an orthonormal basis ``V``
and the relation ``A V = V H + F E^T`` (``F`` the residual block, ``E`` the last ``b`` columns of
the identity), so the Ritz pair ``(theta, V s)`` of ``H`` has the residual norm
``||A V s - theta V s|| = ||R E^T s||`` with ``F = Q R``: convergence is read off the small
matrices, without extra products. Full reorthogonalisation (two classical Gram–Schmidt passes per
block) keeps that relation accurate to working precision.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._probes import Operator


class LanczosResult(NamedTuple):
    """Ritz pairs in the order of preference of ``which`` (the best first)."""

    values: torch.Tensor
    vectors: torch.Tensor
    residual_norms: torch.Tensor
    threshold: float
    converged: bool
    restarts: int
    steps: int  # block products made (one per Lanczos step)


def preference(values: torch.Tensor, which: str) -> torch.Tensor:
    """Indices of ``values`` from the most wanted to the least (``"LA"``, ``"SA"`` or ``"LM"``)."""
    if which == "LA":
        return torch.argsort(values, descending=True, stable=True)
    if which == "SA":
        return torch.argsort(values, stable=True)
    return torch.argsort(values.abs(), descending=True, stable=True)


def _orthogonalize(block: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``block`` without its components along ``basis`` (two passes), and those components.

    Never in place: ``block`` may be a tensor the operator returned and still owns."""
    coefficients = basis.mT @ block
    block = block - basis @ coefficients
    correction = basis.mT @ block
    return block - basis @ correction, coefficients + correction


def _next_block(
    residual: torch.Tensor, basis: torch.Tensor, tiny: float, A: Operator, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual = Q R`` with ``Q`` orthonormal and orthogonal to ``basis``.

    Directions of ``residual`` with singular value ``<= tiny`` (an invariant subspace was found)
    are replaced by random ones, with zero coupling, so the iteration can go on. A direction
    with a singular value just above ``tiny`` is mostly rounding noise, and noise need not be
    orthogonal to ``basis``: the singular vectors are orthogonalised against ``basis`` once more
    (which moves the well-determined ones by rounding only)."""
    U, sigma, Zh = torch.linalg.svd(residual, full_matrices=False)
    R = sigma[:, None] * Zh
    lost = sigma <= tiny
    if bool(lost.any()):
        R[lost] = 0
        U[:, lost] = A.gaussian(int(lost.sum()), generator)
    Q, T = torch.linalg.qr(_orthogonalize(U, basis)[0])
    return Q * torch.sign(torch.diagonal(T)), R


def thick_restart_lanczos(
    A: Operator, k: int, which: str, tol: float, max_matvecs: int, ncv: int, block_size: int, seed: int
) -> LanczosResult:
    """The ``k`` most wanted eigenpairs of ``A`` by block Lanczos with thick restarts.

    ``ncv`` is the largest basis (``k + 2 * block_size <= ncv <= A.size - block_size``); a Ritz
    pair has converged when its residual norm is at most ``tol`` times the largest Ritz value in
    magnitude seen so far (an estimate of ``||A||_2`` from below)."""
    size, b = A.size, block_size
    generator = A.generator(seed)
    V = torch.zeros(size, ncv, dtype=A.dtype, device=A.device)
    H = torch.zeros(ncv, ncv, dtype=A.dtype, device=A.device)
    V[:, :b] = torch.linalg.qr(A.gaussian(b, generator)).Q
    n, restarts, steps, norm_estimate = 0, 0, 0, 0.0
    while True:
        steps += 1
        lo, hi = n, n + b
        W, C = _orthogonalize(A.matmul(V[:, lo:hi]), V[:, :hi])
        H[:hi, lo:hi] = C
        H[lo:hi, :hi] = C.mT
        H[lo:hi, lo:hi] = (C[lo:hi] + C[lo:hi].mT) / 2
        n = hi
        theta, S = torch.linalg.eigh(H[:n, :n])
        norm_estimate = max(norm_estimate, float(theta.abs().max()))
        Q, R = _next_block(W, V[:, :n], max(n, 10) * A.eps * norm_estimate, A, generator)
        order = preference(theta, which)
        wanted = order[:k]
        residuals = torch.linalg.vector_norm(R @ S[n - b : n, wanted], dim=0)
        threshold = tol * norm_estimate
        converged = n >= k and bool((residuals <= threshold).all())
        if converged or (n >= k and A.matvecs + b > max_matvecs):
            break
        if n + b > ncv:
            keep = min(k + (n - k) // 2, ncv - 2 * b)
            V[:, :keep] = V[:, :n] @ S[:, order[:keep]]
            H.zero_()
            H[:keep, :keep] = torch.diag(theta[order[:keep]])
            n, restarts = keep, restarts + 1
        V[:, n : n + b] = Q
    vectors = V[:, :n] @ S[:, wanted]
    return LanczosResult(theta[wanted], vectors, residuals, threshold, converged, restarts, steps)


def batched_lanczos(A: Operator, starts: torch.Tensor, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tridiagonal matrices of ``num_steps`` Lanczos steps from each column of ``starts``.

    ``starts`` is ``(P, K)`` with unit columns; returns ``alpha`` ``(K, num_steps)`` (diagonals)
    and ``beta`` ``(K, num_steps - 1)`` (off-diagonals). Each sequence is reorthogonalised against
    its own basis. When a Krylov space is exhausted (``beta`` at rounding level: an invariant
    subspace), that sequence continues with the zero vector, so the rest of its matrix is zero and
    decoupled: those Ritz values get zero weight in the quadrature."""
    size, K = starts.shape
    basis = torch.zeros(num_steps, size, K, dtype=A.dtype, device=A.device)
    alpha = torch.zeros(num_steps, K, dtype=A.dtype, device=A.device)
    beta = torch.zeros(max(num_steps - 1, 0), K, dtype=A.dtype, device=A.device)
    scale = torch.zeros(K, dtype=A.dtype, device=A.device)
    v = starts
    for j in range(num_steps):
        basis[j] = v
        w = A.matmul(v)
        alpha[j] = (v * w).sum(0)
        if j == num_steps - 1:
            break
        for _ in range(2):
            coefficients = torch.einsum("jpk,pk->jk", basis[: j + 1], w)
            w = w - torch.einsum("jpk,jk->pk", basis[: j + 1], coefficients)  # not in place: `w` is op's
        norm = torch.linalg.vector_norm(w, dim=0)
        scale = torch.maximum(scale, alpha[j].abs() + norm)
        alive = norm > 10 * (j + 1) * A.eps * scale
        beta[j] = torch.where(alive, norm, 0)
        v = torch.where(alive, w / torch.where(alive, norm, 1), 0)
    return alpha.mT, beta.mT
