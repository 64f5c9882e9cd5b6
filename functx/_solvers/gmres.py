"""Restarted GMRES (Saad & Schultz 1986), right-preconditioned, for general square operators.

Each cycle builds an orthonormal Krylov basis by Arnoldi with classical Gram-Schmidt
applied twice (CGS2: two matrix products per step, orthogonal to working precision) and
keeps the QR factorisation of the Hessenberg matrix up to date with Givens rotations, so
the residual norm ``|g[j + 1]|`` is known after every step without forming ``x``.

Masking: a step taken after a lane has converged is "unused": its column of the
triangular factor is replaced by ``e_j`` and its right-hand side entry by 0, so it
contributes nothing to the update. At the start of every cycle the true residual
``b - A x`` is recomputed, and a lane whose recursive estimate was optimistic is reactivated.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._tree import PyTree
from .._validate import check_int
from ._common import (
    LinearProblem,
    Solution,
    div,
    finish,
    norm,
    safe_sqrt,
    setup,
    stop,
    warn_fixed_trip_count,
)


def _givens(a: torch.Tensor, h: torch.Tensor, use: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotation ``[[conj(c), s], [-s, c]]`` (``s`` real) with ``(a, h) -> (r, 0)``; the identity
    where ``use`` is False or ``a = h = 0``."""
    r = safe_sqrt(a.real * a.real + a.imag * a.imag + h * h) if a.is_complex() else safe_sqrt(a * a + h * h)
    ok = use & (r > 0)
    c = torch.where(ok, div(a, r.to(a.dtype), ok), 1.0)
    s = torch.where(ok, div(h, r, ok), 0.0)
    return c, s, r


def _cycle(
    problem: LinearProblem, x: torch.Tensor, r: torch.Tensor, active: torch.Tensor, m: int, iterations: torch.Tensor
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """At most ``m`` Arnoldi steps from ``x`` (residual ``r``); returns ``(x, steps, iterations)``."""
    start_active, tol, dtype = active, problem.target, r.dtype
    beta = torch.linalg.vector_norm(r)
    basis = [r * div(torch.ones_like(beta), beta, active & (beta > 0)).to(dtype)]
    g = [beta.to(dtype)]  # rotated right-hand side beta e_1
    columns: list[list[torch.Tensor]] = []
    rotations: list[tuple[torch.Tensor, torch.Tensor]] = []
    used: list[torch.Tensor] = []
    for j in range(m):
        if stop(active, problem.early_exit):
            break
        w = problem.A(problem.precondition(basis[j]))
        V = torch.stack(basis)
        h = V.conj() @ w
        w = w - h @ V
        h2 = V.conj() @ w  # second Gram-Schmidt pass
        w = w - h2 @ V
        h = h + h2
        hn = torch.linalg.vector_norm(w)
        basis.append(w * div(torch.ones_like(hn), hn, active & (hn > 0)).to(dtype))
        col = list(h.unbind(0))
        for i, (c, s) in enumerate(rotations):
            col[i], col[i + 1] = c.conj() * col[i] + s * col[i + 1], c * col[i + 1] - s * col[i]
        c, s, rr = _givens(col[j], hn, active)
        col[j] = torch.where(active & (rr > 0), rr, 1.0).to(dtype)
        columns.append([torch.where(active, entry, 0.0) for entry in col[:j]] + [torch.where(active, col[j], 1.0)])
        rotations.append((c, s))
        g[j], g_next = c.conj() * g[j], -s * g[j]
        g.append(g_next)
        used.append(active)
        iterations = iterations + active.to(torch.int64)
        active = active & (g_next.abs().detach() > tol)
    k = len(columns)
    if k == 0:
        return x, 0, iterations
    zero = torch.zeros((), dtype=dtype, device=r.device)
    R = torch.stack([torch.stack(col + [zero] * (k - len(col))) for col in columns], dim=1)
    rhs = torch.stack([torch.where(u, gj, 0.0) for u, gj in zip(used, g)])
    y = torch.linalg.solve_triangular(R, rhs[:, None], upper=True)[:, 0]
    dx = problem.precondition(y @ torch.stack(basis[:k]))
    return torch.where(start_active, x + dx, x), k, iterations


def run_gmres(problem: LinearProblem, restart: int) -> Solution:
    x, r = problem.start()
    iterations = torch.zeros((), dtype=torch.int64, device=r.device)
    steps = 0
    warn_fixed_trip_count(norm(r) > problem.tol, problem.max_iter, problem.early_exit)
    while steps < problem.max_iter:  # a Python int: the same trip count in every lane
        active = norm(r) > problem.tol
        if stop(active, problem.early_exit):
            break
        x, taken, iterations = _cycle(problem, x, r, active, min(restart, problem.max_iter - steps), iterations)
        steps += taken
        r = problem.b - problem.A(x)
    return finish(problem, x, iterations, residual=r)


def gmres(
    matvec: Callable[[PyTree], PyTree],
    b: PyTree,
    x0: PyTree = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    max_iter: int | None = None,
    preconditioner: Callable[[PyTree], PyTree] | None = None,
    ridge: float | torch.Tensor | None = None,
    restart: int = 20,
    throw: bool = False,
) -> Solution:
    """Solve ``(A + ridge I) x = b`` by restarted GMRES, for general square ``A``.

    GMRES minimises ``||b - A x||`` over a Krylov space of dimension ``restart``, then
    restarts from the current iterate. One matvec per iteration; it stores
    ``restart + 1`` vectors. With ``restart >= n`` it is full GMRES (exact in ``n``
    steps in exact arithmetic); smaller values bound memory and may slow convergence.

    Args:
        matvec: ``x -> A x``, linear, on pytrees shaped like ``b``.
        b: the right-hand side, a pytree of floating-point (or complex) tensors.
        x0: initial guess shaped like ``b``. (default: ``None``, zeros)
        rtol: relative tolerance: converged when ``||b - A x|| <= max(atol, rtol ||b||)``.
            (default: ``None``, by dtype: 1e-12 for float64, 1e-5 for float32)
        atol: absolute tolerance. (default: ``None``, 0)
        max_iter: maximum total number of Arnoldi steps (matvecs), over all restarts.
            (default: ``None``, ``min(10 n, 1000)``)
        preconditioner: ``r -> M r`` with ``M`` an approximation of ``A^{-1}``, applied on
            the right (the residual minimised and tested is the true one).
            (default: ``None``)
        ridge: shift added to ``A``: a float or a real 0-d tensor. (default: ``None``)
        restart: Krylov dimension of one cycle. (default: ``20``)
        throw: raise :class:`functx.NonConvergenceError` (carrying the statistics) when
            the solve did not converge; otherwise ``converged`` reports it. Read in eager
            mode and under every transform, not under ``torch.compile``. (default: ``False``)

    Returns:
        A :class:`Solution` ``(value, num_steps, residual_norm, converged)``;
        ``num_steps`` counts Arnoldi steps.

    Example:
        >>> import torch
        >>> from functx import solvers
        >>> A = torch.tensor([[3.0, 1.0], [-1.0, 2.0]], dtype=torch.float64)
        >>> sol = solvers.gmres(lambda x: {"u": A @ x["u"]}, {"u": torch.tensor([4.0, 1.0], dtype=torch.float64)})
        >>> sol.value["u"].round(decimals=8), sol.num_steps
        (tensor([1., 1.], dtype=torch.float64), tensor(2))
    """
    restart = check_int(restart, "restart", "solvers.gmres", minimum=1)
    problem = setup(
        "solvers.gmres",
        matvec,
        b,
        x0,
        rtol=rtol,
        atol=atol,
        max_iter=max_iter,
        preconditioner=preconditioner,
        ridge=ridge,
        throw=throw,
    )
    return run_gmres(problem, restart)
