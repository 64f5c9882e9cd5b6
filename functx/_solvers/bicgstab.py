"""BiCGStab (van der Vorst 1992), right-preconditioned, for general square operators."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .._tree import PyTree
from ._common import LinearProblem, Solution, div, finish, iterate, norm, setup


class _State(NamedTuple):
    x: torch.Tensor
    r: torch.Tensor  # b - A x (recursive)
    rhat: torch.Tensor  # shadow residual
    p: torch.Tensor
    v: torch.Tensor  # A M p
    rho: torch.Tensor
    alpha: torch.Tensor
    omega: torch.Tensor


def run_bicgstab(problem: LinearProblem) -> Solution:
    A, tol = problem.A, problem.target
    x, r = problem.start()
    one = torch.ones((), dtype=r.dtype, device=r.device)
    state = _State(x, r, r, torch.zeros_like(r), torch.zeros_like(r), one, one, one)

    def step(s: _State, active: torch.Tensor) -> tuple[_State, torch.Tensor]:
        rho = torch.vdot(s.rhat, s.r)
        beta = div(rho, s.rho, active & (s.rho != 0)) * div(s.alpha, s.omega, active & (s.omega != 0))
        p = s.r + beta * (s.p - s.omega * s.v)
        phat = problem.precondition(p)
        v = A(phat)
        rv = torch.vdot(s.rhat, v)
        alpha = div(rho, rv, active & (rv != 0))
        q = s.r - alpha * v  # the half-step residual
        qhat = problem.precondition(q)
        t = A(qhat)
        tt = torch.vdot(t, t)
        omega = div(torch.vdot(t, q), tt, active & (tt != 0))
        x = s.x + alpha * phat + omega * qhat
        r = q - omega * t
        return _State(x, r, s.rhat, p, v, rho, alpha, omega), norm(r) > tol

    state, iterations = iterate(step, state, norm(r) > tol, problem.max_iter, problem.early_exit)
    return finish(problem, state.x, iterations)


def bicgstab(
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
    """Solve ``(A + ridge I) x = b`` by BiCGStab, for general (nonsymmetric) square ``A``.

    Two matvecs per iteration and constant memory (seven vectors), against GMRES's one
    matvec per iteration and ``restart + 1`` stored vectors. Convergence is not monotone
    and can break down (``converged`` is then False); :func:`gmres` is the robust choice.

    Args:
        matvec: ``x -> A x``, linear, on pytrees shaped like ``b``.
        b: the right-hand side, a pytree of floating-point (or complex) tensors.
        x0: initial guess shaped like ``b``. (default: ``None``, zeros)
        rtol: relative tolerance: converged when ``||b - A x|| <= max(atol, rtol ||b||)``.
            (default: ``None``, by dtype: 1e-12 for float64, 1e-5 for float32)
        atol: absolute tolerance. (default: ``None``, 0)
        max_iter: maximum number of iterations (two matvecs each).
            (default: ``None``, ``min(10 n, 1000)``)
        preconditioner: ``r -> M r`` with ``M`` an approximation of ``A^{-1}``, applied on
            the right (the residual tested is the true, unpreconditioned one).
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
        >>> A = torch.tensor([[3.0, 1.0], [-1.0, 2.0]], dtype=torch.float64)
        >>> sol = solvers.bicgstab(lambda x: A @ x, torch.tensor([4.0, 1.0], dtype=torch.float64))
        >>> sol.value.round(decimals=8), bool(sol.converged)
        (tensor([1., 1.], dtype=torch.float64), True)
    """
    problem = setup(
        "solvers.bicgstab",
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
    return run_bicgstab(problem)
