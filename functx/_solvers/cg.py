"""Conjugate gradients, and CG on the normal equations (one kernel)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .._tree import PyTree
from .._validate import check_callable
from .._vjp_jvp import vjp
from ._common import (
    Flat,
    Layout,
    LinearProblem,
    Solution,
    cast_ridge,
    check_options,
    check_ridge,
    div,
    early_exit_allowed,
    finish,
    flat_map,
    iterate,
    norm,
    owned,
    raise_dtype_hint,
    setup,
    shifted,
    threshold,
)


class _State(NamedTuple):
    x: torch.Tensor
    r: torch.Tensor  # b - A x (recursive)
    p: torch.Tensor  # search direction
    rz: torch.Tensor  # <r, M r>


def run_cg(problem: LinearProblem) -> Solution:
    """Preconditioned CG on a validated problem (``A`` Hermitian positive definite)."""
    A, tol = problem.A, problem.target
    x, r = problem.start()
    z = problem.precondition(r)
    state = _State(x, r, z, torch.vdot(r, z))

    def step(s: _State, active: torch.Tensor) -> tuple[_State, torch.Tensor]:
        Ap = A(s.p)
        pAp = torch.vdot(s.p, Ap)
        alpha = div(s.rz, pAp, active & (pAp != 0))
        x = s.x + alpha * s.p
        r = s.r - alpha * Ap
        z = problem.precondition(r)
        rz = torch.vdot(r, z)
        p = z + div(rz, s.rz, active & (s.rz != 0)) * s.p
        return _State(x, r, p, rz), norm(r) > tol

    state, iterations = iterate(step, state, norm(r) > tol, problem.max_iter, problem.early_exit)
    return finish(problem, state.x, iterations)


def cg(
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
    """Solve ``(A + ridge I) x = b`` by (preconditioned) conjugate gradients.

    ``A`` must be symmetric (Hermitian) positive definite: for example a Hessian at a
    minimum, ``X^T X``, a kernel matrix. For symmetric indefinite operators use
    :func:`minres`, for general ones :func:`gmres` or :func:`bicgstab`.

    Args:
        matvec: ``x -> A x``, a linear function from pytrees shaped like ``b`` to pytrees
            shaped like ``b`` (same structure, shapes and dtypes).
        b: the right-hand side, a pytree of floating-point (or complex) tensors.
        x0: initial guess shaped like ``b``. (default: ``None``, zeros)
        rtol: relative tolerance: converged when ``||b - A x|| <= max(atol, rtol ||b||)``.
            (default: ``None``, by dtype: 1e-12 for float64, 1e-5 for float32)
        atol: absolute tolerance. (default: ``None``, 0)
        max_iter: maximum number of iterations (one matvec each).
            (default: ``None``, ``min(10 n, 1000)`` with ``n`` the total size of ``b``)
        preconditioner: ``r -> M r`` with ``M`` a symmetric positive definite
            approximation of ``A^{-1}``. (default: ``None``)
        ridge: Tikhonov shift added to ``A``: a float or a real 0-d tensor (differentiable).
            (default: ``None``)
        throw: raise :class:`functx.NonConvergenceError` (carrying the statistics) when
            the solve did not converge; otherwise ``converged`` reports it. Read in eager
            mode and under every transform, not under ``torch.compile``. (default: ``False``)

    Returns:
        A :class:`Solution` ``(value, num_steps, residual_norm, converged)``.

    Example:
        >>> import torch
        >>> from functx import solvers
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> sol = solvers.cg(lambda x: A @ x, torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> sol.value
        tensor([0.0909, 0.6364], dtype=torch.float64)
        >>> sol.num_steps, bool(sol.converged)
        (tensor(2), True)
    """
    problem = setup(
        "solvers.cg",
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
    return run_cg(problem)


def normal_cg(
    matvec: Callable[[PyTree], PyTree],
    b: PyTree,
    x0: PyTree = None,
    *,
    rmatvec: Callable[[PyTree], PyTree] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_iter: int | None = None,
    preconditioner: Callable[[PyTree], PyTree] | None = None,
    ridge: float | torch.Tensor | None = None,
    throw: bool = False,
) -> Solution:
    """Solve the least-squares problem ``min ||A x - b||^2 + ridge ||x||^2`` by CG on the
    normal equations ``(A^H A + ridge I) x = A^H b``.

    Works for any ``A``, square or rectangular, full rank or (with ``ridge > 0``) not;
    the normal equations square the condition number, so prefer :func:`gmres` or
    :func:`bicgstab` for square nonsymmetric systems that are not well conditioned.

    The solution space is the structure of ``x0`` if given, else of ``rmatvec(b)`` if
    ``rmatvec`` is given, else of ``b`` (a square ``A``): pass ``x0`` or ``rmatvec`` when
    ``A`` is rectangular.

    Args:
        matvec: ``x -> A x``, linear, from the solution space to pytrees shaped like ``b``.
        b: the right-hand side (observations), a pytree of floating-point tensors.
        x0: initial guess, a pytree in the solution space. (default: ``None``, zeros)
        rmatvec: ``y -> A^H y``. (default: ``None``: derived with :func:`functx.vjp` of
            ``matvec``, once per call)
        rtol: relative tolerance on the normal-equation residual:
            converged when ``||A^H b - (A^H A + ridge I) x|| <= max(atol, rtol ||A^H b||)``.
            (default: ``None``, by dtype: 1e-12 for float64, 1e-5 for float32)
        atol: absolute tolerance. (default: ``None``, 0)
        max_iter: maximum number of iterations (one ``matvec`` and one ``rmatvec`` each).
            (default: ``None``, ``min(10 n, 1000)`` with ``n`` the size of the solution)
        preconditioner: an approximation of ``(A^H A + ridge I)^{-1}``, on the solution
            space. (default: ``None``)
        ridge: Tikhonov regularisation ``ridge`` (a float or a real 0-d tensor).
            (default: ``None``)
        throw: raise :class:`functx.NonConvergenceError` (carrying the statistics) when
            the solve did not converge; otherwise ``converged`` reports it. Read in eager
            mode and under every transform, not under ``torch.compile``. (default: ``False``)

    Returns:
        A :class:`Solution`; ``value`` lives in the solution space and ``residual_norm``
        is the norm of the normal-equation residual ``A^H b - (A^H A + ridge I) x``
        (for least squares, ``||b - A x||`` does not go to zero).

    Example:
        >>> import torch
        >>> from functx import solvers
        >>> X = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> y = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
        >>> sol = solvers.normal_cg(lambda w: X @ w, y, x0=torch.zeros(2, dtype=torch.float64))
        >>> sol.value  # intercept and slope of the least-squares line
        tensor([0.8333, 1.5000], dtype=torch.float64)
    """
    api = "solvers.normal_cg"
    check_callable(matvec, "matvec", api)
    check_callable(rmatvec, "rmatvec", api, optional=True)
    check_callable(preconditioner, "preconditioner", api, optional=True)
    b_layout = Layout(b, "b", api)
    flat_b = owned(b_layout.ravel(b, "b", "`b`"), b_layout.like)
    products = [0]
    x_layout, rhs = _solution_space(matvec, rmatvec, flat_b, x0, b_layout, api, products)
    rtol, atol, max_iter, throw = check_options(api, x_layout.dtype, x_layout.size, rtol, atol, max_iter, throw)
    ridge = cast_ridge(check_ridge(ridge, api), x_layout)
    A = flat_map(matvec, x_layout, b_layout, "matvec", "x", products)
    AT = _adjoint(matvec, rmatvec, x_layout, b_layout, products)
    if rhs is None:
        rhs = AT(flat_b)
    flat_x0 = None if x0 is None else owned(x_layout.ravel(x0, "x0", "`x0`"), x_layout.like)
    M = None if preconditioner is None else flat_map(preconditioner, x_layout, x_layout, "preconditioner", "r")
    problem = LinearProblem(
        x_layout,
        rhs,
        flat_x0,
        shifted(lambda v: AT(A(v)), ridge),
        M,
        threshold(rhs, rtol, atol),
        max_iter,
        early_exit_allowed(flat_b, flat_x0),
        throw,
        products,
    )
    return run_cg(problem)


def _solution_space(
    matvec: Any, rmatvec: Any, flat_b: torch.Tensor, x0: PyTree, b_layout: Layout, api: str, products: list[int]
) -> tuple[Layout, torch.Tensor | None]:
    """The layout of ``x`` and, when ``rmatvec(b)`` had to be evaluated for it, ``A^H b``
    (``rmatvec`` gets a copy of ``b``, never the caller's tensors)."""
    if x0 is not None:
        return Layout(x0, "x0", api), None
    if rmatvec is not None:
        rhs_tree = rmatvec(b_layout.unravel(flat_b))
        products[0] += 1
        layout = Layout(rhs_tree, "rmatvec(b)", api)
        return layout, layout.ravel(rhs_tree, "rmatvec(b)", "the output of `rmatvec`")
    return b_layout, None


def _adjoint(matvec: Any, rmatvec: Any, x_layout: Layout, b_layout: Layout, products: list[int]) -> Flat:
    """``y -> A^H y`` on flat vectors: ``rmatvec`` if given, else a VJP of ``matvec`` (linear,
    so the VJP at zero is the adjoint everywhere)."""
    if rmatvec is not None:
        return flat_map(rmatvec, b_layout, x_layout, "rmatvec", "y", products)
    zero = x_layout.unravel(x_layout.zeros())
    try:
        out, vjp_fn = vjp(matvec, zero)
    except RuntimeError as e:  # most often a rectangular A applied to a vector shaped like b
        raise_dtype_hint(e, "solvers.normal_cg", "matvec", "x", x_layout)
        raise ValueError(
            "`functx.solvers.normal_cg`: `matvec` failed on a vector shaped like `b` (the solution "
            "space when neither `x0` nor `rmatvec` is given, i.e. a square A). For a rectangular A, "
            f"pass `x0` (a pytree in the solution space) or `rmatvec`. The error was: {e}"
        ) from e
    b_layout.check(out, "matvec(x)", "the output of `matvec`")
    products[0] += 1

    def adjoint(y: torch.Tensor) -> torch.Tensor:
        products[0] += 1
        return x_layout.ravel(vjp_fn(b_layout.unravel(y))[0], "rmatvec(y)", "the adjoint of `matvec`")

    return adjoint
