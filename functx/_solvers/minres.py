"""MINRES (Paige & Saunders 1975) for symmetric, possibly indefinite, operators.

The recurrence follows SciPy's ``minres`` (itself from Paige & Saunders' reference code):
a preconditioned Lanczos process with a QR factorisation of the tridiagonal matrix kept
up to date by Givens rotations; ``phibar`` is the residual estimate. All Lanczos and
rotation scalars are real, also for complex Hermitian operators.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .._tree import PyTree
from ._common import LinearProblem, Solution, div, finish, iterate, safe_sqrt, setup


class _State(NamedTuple):
    x: torch.Tensor
    r1: torch.Tensor  # previous and current (unnormalised) Lanczos vectors
    r2: torch.Tensor
    y: torch.Tensor  # M r2
    w: torch.Tensor  # the last two search directions
    w2: torch.Tensor
    beta: torch.Tensor  # current and previous Lanczos off-diagonals
    oldb: torch.Tensor
    dbar: torch.Tensor
    epsln: torch.Tensor
    phibar: torch.Tensor
    cs: torch.Tensor
    sn: torch.Tensor


def _initial(problem: LinearProblem) -> tuple[_State, torch.Tensor]:
    x, r = problem.start()
    y = problem.precondition(r)
    beta = safe_sqrt(torch.vdot(r, y).real)
    zero, zeros = torch.zeros_like(beta), torch.zeros_like(r)
    state = _State(x, r, r, y, zeros, zeros, beta, zero, zero, zero, beta, -torch.ones_like(beta), zero)
    # The loop tests phibar, an estimate of the residual in the M^{-1} norm: rescale the
    # threshold by beta1 / ||r0|| (1 without a preconditioner).
    rnorm = torch.linalg.vector_norm(r.detach())
    scale = div(beta.detach(), rnorm, rnorm > 0)
    return state, torch.where(rnorm > 0, problem.target * scale, problem.target)


def run_minres(problem: LinearProblem) -> Solution:
    A = problem.A
    eps = torch.finfo(problem.layout.real_dtype).eps
    state, tol = _initial(problem)

    def step(s: _State, active: torch.Tensor) -> tuple[_State, torch.Tensor]:
        v = s.y * div(torch.ones_like(s.beta), s.beta, active & (s.beta > 0))
        y = A(v) - div(s.beta, s.oldb, active & (s.oldb > 0)) * s.r1
        alfa = torch.vdot(v, y).real
        y = y - div(alfa, s.beta, active & (s.beta > 0)) * s.r2
        r1, r2 = s.r2, y
        y = problem.precondition(r2)
        beta = safe_sqrt(torch.vdot(r2, y).real)
        # Apply the previous rotation, then compute and apply the next one.
        delta = s.cs * s.dbar + s.sn * alfa
        gbar = s.sn * s.dbar - s.cs * alfa
        epsln = s.sn * beta
        dbar = -s.cs * beta
        gamma = torch.clamp(safe_sqrt(gbar * gbar + beta * beta), min=eps)
        cs, sn = gbar / gamma, beta / gamma
        phi, phibar = cs * s.phibar, sn * s.phibar
        w = (v - s.epsln * s.w2 - delta * s.w) / gamma
        x = s.x + phi * w
        new = _State(x, r1, r2, y, w, s.w, beta, s.beta, dbar, epsln, phibar, cs, sn)
        return new, phibar.detach() > tol

    state, iterations = iterate(step, state, state.phibar.detach() > tol, problem.max_iter, problem.early_exit)
    return finish(problem, state.x, iterations)


def minres(
    matvec: Callable[[PyTree], PyTree],
    b: PyTree,
    x0: PyTree = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    max_iter: int | None = None,
    preconditioner: Callable[[PyTree], PyTree] | None = None,
    ridge: float | torch.Tensor | None = None,
    throw: bool = False,
) -> Solution:
    """Solve ``(A + ridge I) x = b`` by MINRES, for symmetric (Hermitian) ``A``.

    ``A`` may be indefinite (a Hessian at a saddle point, a KKT matrix); MINRES minimises
    ``||b - A x||`` over a Krylov space with one matvec per iteration and short
    recurrences. A negative ``ridge`` is allowed (a shifted system).

    Args:
        matvec: ``x -> A x``, linear and symmetric, on pytrees shaped like ``b``.
        b: the right-hand side, a pytree of floating-point (or complex) tensors.
        x0: initial guess shaped like ``b``. (default: ``None``, zeros)
        rtol: relative tolerance: converged when ``||b - A x|| <= max(atol, rtol ||b||)``.
            (default: ``None``, by dtype: 1e-12 for float64, 1e-5 for float32)
        atol: absolute tolerance. (default: ``None``, 0)
        max_iter: maximum number of iterations (one matvec each).
            (default: ``None``, ``min(10 n, 1000)``)
        preconditioner: ``r -> M r`` with ``M`` symmetric *positive definite* (even when
            ``A`` is indefinite). The loop stops on MINRES's estimate of the residual in
            the ``M^{-1}`` norm; ``converged`` is always decided on the true residual.
            (default: ``None``)
        ridge: shift added to ``A``: a float or a real 0-d tensor. (default: ``None``)
        throw: raise :class:`functx.NonConvergenceError` (carrying the statistics) when
            the solve did not converge; otherwise ``converged`` reports it. Read in eager
            mode and under every transform, not under ``torch.compile``. (default: ``False``)

    Returns:
        A :class:`Solution` ``(value, num_steps, residual_norm, converged)``.

    Example:
        >>> import torch
        >>> from functx import solvers
        >>> A = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64)  # indefinite
        >>> sol = solvers.minres(lambda x: A @ x, torch.tensor([3.0, 3.0], dtype=torch.float64))
        >>> sol.value.round(decimals=8), bool(sol.converged)
        (tensor([1., 1.], dtype=torch.float64), True)
    """
    problem = setup(
        "solvers.minres",
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
    return run_minres(problem)
