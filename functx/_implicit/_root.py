"""``custom_root``, ``custom_fixed_point``, ``root_vjp`` and ``root_jvp``: the public entry points.

The machinery (flattening, the implicit function theorem, the ``autograd.Function``) is in
:mod:`._problem`; here are the decorators and the two products usable directly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from .._core import is_differentiable
from .._solvers.linear_solve import OnFailure, SolveName, Tensors
from .._tree import PyTree, flatten_like, tree_flatten, tree_unflatten
from .._validate import check_bool, check_callable, describe
from ._problem import Options, RootProblem, call_root

# --------------------------------------------------------------------------------------
# Public entry points.


def custom_root(
    optimality_fn: Callable[..., Any],
    *,
    solve: SolveName | Callable[..., Any] = "auto",
    symmetric: bool = False,
    has_aux: bool = False,
    throw: bool = False,
    on_failure: OnFailure | None = None,
    residual_tol: float | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a solver with implicit derivatives defined by an optimality condition.

    ``@custom_root(F)`` turns ``solver(init, *args, **kwargs) -> z`` into a function with
    the same value whose derivatives with respect to ``args``/``kwargs`` are those of the
    root ``z*(args)`` of ``F(z, *args, **kwargs) = 0``, computed by the implicit function
    theorem: one linear solve with ``A = dF/dz`` (forward mode) or ``A^T`` (reverse mode) per
    product, whatever the solver did. The solver runs without autograd; no derivative flows
    to ``init``. Works under every functx / torch.func transform, at every order, and
    under ``vmap`` (the solver and linear solves must then be vmappable: fixed trip counts,
    no ``.item()``).

    Tensors that ``F`` uses but that are not arguments (closures, globals) get no
    derivatives: ``F`` is evaluated once per call with a check that raises ``ValueError``
    if it touches a captured tensor that requires grad or that an enclosing transform
    traces. Pass such tensors as arguments.

    Args:
        optimality_fn: ``F(z, *args, **kwargs)``, returning a pytree shaped like ``z`` (same
            structure, shapes, dtypes) that vanishes at the solution.
        solve: the linear solver for ``A x = b``: ``"auto"``, ``"cg"``, ``"gmres"``,
            ``"bicgstab"``, ``"minres"``, ``"normal_cg"``, ``"lu"``, ``"cholesky"`` (see
            :mod:`functx.solvers`) or a callable ``solve(matvec, b)`` returning ``x`` or a
            :class:`functx.solvers.Solution`. ``"auto"`` is ``"cg"`` when ``symmetric`` and
            ``"gmres"`` otherwise. (default: ``"auto"``)
        symmetric: declare ``dF/dz`` symmetric, e.g. ``F`` is the gradient of an objective
            (then ``A v`` is computed by reverse mode too, and CG is the default solve,
            which further needs ``A`` positive definite: a strict local minimum). Implied by
            ``solve`` in ``"cg"``, ``"minres"``, ``"cholesky"``. (default: ``False``)
        has_aux: whether the solver returns ``(z, aux)``; ``aux`` is returned as is (its
            tensors without derivatives). (default: ``False``)
        throw: when the forward residual check or a linear solve fails, raise
            :class:`functx.NonConvergenceError` (carrying the statistics) instead of
            warning with :class:`functx.NonConvergenceWarning`. Under ``vmap`` a failure in
            any lane is reported; under ``torch.compile`` (where the flags cannot be read)
            nothing is. (default: ``False``)
        on_failure: deprecated (removed in the next release): ``"raise"`` is
            ``throw=True``, ``"warn"`` is ``throw=False``, ``"ignore"`` is ``throw=False``
            without the warning. (default: ``None``)
        residual_tol: the forward check ``||F(z*, ...)|| <= residual_tol``. (default:
            ``None``: ``sqrt(eps) * (1 + ||z*||)`` in the dtype of ``z*``)

    Returns:
        A decorator; the decorated function has the solver's signature and returns ``z``
        (or ``(z, aux)``).

    Example:
        >>> import torch, functx
        >>> from functx.implicit import custom_root
        >>> F = lambda z, a: z ** 3 - a  # root: the cube root of a
        >>> @custom_root(F)
        ... def cube_root(init, a):
        ...     z = init
        ...     for _ in range(50):  # Newton's method, not differentiated
        ...         z = z - (z ** 3 - a) / (3 * z ** 2)
        ...     return z
        >>> a = torch.tensor(8.0, dtype=torch.float64)
        >>> cube_root(torch.tensor(1.0, dtype=torch.float64), a)
        tensor(2., dtype=torch.float64)
        >>> functx.grad(lambda a: cube_root(torch.tensor(1.0, dtype=torch.float64), a))(a)  # a^(-2/3) / 3
        tensor(0.0833, dtype=torch.float64)
    """
    api = "implicit.custom_root"
    check_callable(optimality_fn, "optimality_fn", api)
    options = Options.make(api, "optimality_fn", solve, symmetric, throw, on_failure, residual_tol)
    return _decorator(optimality_fn, options, has_aux)


def custom_fixed_point(
    fixed_point_fn: Callable[..., Any],
    *,
    solve: SolveName | Callable[..., Any] = "auto",
    symmetric: bool = False,
    has_aux: bool = False,
    throw: bool = False,
    on_failure: OnFailure | None = None,
    residual_tol: float | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a solver with implicit derivatives of a fixed point ``z = T(z, *args, **kwargs)``.

    This is :func:`custom_root` with ``F(z, ...) = T(z, ...) - z``. Its Jacobian ``dT/dz - I``
    is not symmetric in general, so the default solve is GMRES.

    Args:
        fixed_point_fn: ``T(z, *args, **kwargs)``, returning a pytree shaped like ``z``.
        solve: as in :func:`custom_root`. (default: ``"auto"``: ``"gmres"``)
        symmetric: declare ``dT/dz`` symmetric (e.g. ``T`` a gradient step on an
            objective). (default: ``False``)
        has_aux: whether the solver returns ``(z, aux)``. (default: ``False``)
        throw: raise :class:`functx.NonConvergenceError` instead of warning; see
            :func:`custom_root`. (default: ``False``)
        on_failure: deprecated; see :func:`custom_root`. (default: ``None``)
            (default: ``"warn"``)
        residual_tol: the forward check ``||T(z*) - z*|| <= residual_tol``. (default:
            ``None``: ``sqrt(eps) * (1 + ||z*||)``)

    Returns:
        A decorator for ``solver(init, *args, **kwargs) -> z``.

    Example:
        >>> import torch, functx
        >>> from functx.implicit import custom_fixed_point
        >>> T = lambda z, a: torch.cos(a * z)  # z = cos(a z)
        >>> @custom_fixed_point(T)
        ... def fixed_point(init, a):
        ...     z = init
        ...     for _ in range(200):
        ...         z = T(z, a)
        ...     return z
        >>> a = torch.tensor(0.5, dtype=torch.float64)
        >>> z = fixed_point(torch.tensor(0.0, dtype=torch.float64), a)
        >>> dz = functx.grad(lambda a: fixed_point(torch.tensor(0.0, dtype=torch.float64), a))(a)
        >>> s = torch.sin(a * z)  # differentiate z = cos(a z) by hand:
        >>> torch.allclose(dz, -z * s / (1 + a * s))
        True
    """
    api = "implicit.custom_fixed_point"
    check_callable(fixed_point_fn, "fixed_point_fn", api)
    options = Options.make(api, "fixed_point_fn", solve, symmetric, throw, on_failure, residual_tol)
    return _decorator(fixed_point_residual(fixed_point_fn, api), options, has_aux)


def fixed_point_residual(fixed_point_fn: Callable[..., Any], api: str) -> Callable[..., Any]:
    """``F(z, ...) = T(z, ...) - z``, with ``T``'s output checked against ``z`` before the
    subtraction (which would broadcast a scalar or mismatched shape without a word)."""

    @functools.wraps(fixed_point_fn)
    def residual(z: PyTree, *args: Any, **kwargs: Any) -> PyTree:
        out = fixed_point_fn(z, *args, **kwargs)
        z_leaves, z_spec = tree_flatten(z)
        leaves = flatten_like(
            out,
            z_spec,
            z_leaves,
            name="output",
            root="fixed_point_fn(z, ...)",
            api=api,
            ref="the solution z",
            what="the output of `fixed_point_fn`",
        )
        return tree_unflatten(z_spec, [t - zi for t, zi in zip(leaves, z_leaves)])

    return residual


def _decorator(optimality_fn: Callable[..., Any], options: Options, has_aux: bool) -> Callable[..., Any]:
    check_bool(has_aux, "has_aux", options.api)

    def decorator(solver: Callable[..., Any]) -> Callable[..., Any]:
        check_callable(solver, "solver", options.api)

        @functools.wraps(solver)
        def implicit_solver(init: PyTree, *args: Any, **kwargs: Any) -> Any:
            return call_root(RootProblem(options, optimality_fn, solver, has_aux, init, args, kwargs))

        return implicit_solver

    return decorator


# --------------------------------------------------------------------------------------
# The primitives, usable directly.


def root_vjp(
    optimality_fn: Callable[..., Any],
    solution: PyTree,
    args: tuple[Any, ...],
    cotangent: PyTree,
    *,
    solve: SolveName | Callable[..., Any] = "auto",
    symmetric: bool = False,
    throw: bool = False,
    on_failure: OnFailure | None = None,
    residual_tol: float | None = None,
) -> tuple[Any, ...]:
    """Vector-Jacobian product of the root ``z*(args)`` of ``F(z, *args) = 0``.

    Computes ``-B^T A^{-T} cotangent`` with ``A = dF/dz`` and ``B = dF/dargs`` at
    ``(solution, args)``: one linear solve. The result is differentiable again (in
    ``solution``, ``args`` and ``cotangent``, each treated as an independent input).

    Args:
        optimality_fn: ``F(z, *args)``, returning a pytree shaped like ``z``.
        solution: the root ``z*``, a pytree of floating-point tensors.
        args: a tuple of the other arguments of ``F`` (pytrees).
        cotangent: a pytree shaped like ``solution``.
        solve: the linear solver; see :func:`custom_root`. (default: ``"auto"``)
        symmetric: declare ``dF/dz`` symmetric; see :func:`custom_root`. (default: ``False``)
        throw: raise :class:`functx.NonConvergenceError` instead of warning; see
            :func:`custom_root`. (default: ``False``)
        on_failure: deprecated; see :func:`custom_root`. (default: ``None``)
        residual_tol: the check ``||F(solution, *args)|| <= residual_tol``. (default:
            ``None``: ``sqrt(eps) * (1 + ||z||)``)

    Returns:
        A tuple with one pytree per entry of ``args``, shaped like it; leaves that are not
        floating-point tensors get ``None``.

    Example:
        >>> import torch
        >>> from functx.implicit import root_vjp
        >>> F = lambda z, a: z ** 2 - a  # z* = sqrt(a)
        >>> a = torch.tensor(4.0, dtype=torch.float64)
        >>> root_vjp(F, torch.sqrt(a), (a,), torch.tensor(1.0, dtype=torch.float64))
        (tensor(0.2500, dtype=torch.float64),)
    """
    api = "implicit.root_vjp"
    problem, z, d, s = _primitive_problem(
        api, optimality_fn, solution, args, solve, symmetric, throw, on_failure, residual_tol
    )
    z_bar = flatten_like(cotangent, problem.z_spec, z, name="cotangent", api=api, ref="the solution")
    d_bar = iter(problem.vjp(z, d, s, z_bar))
    leaves = [next(d_bar) if k in problem.diff_pos else None for k in range(len(problem.arg_leaves))]
    return tree_unflatten(problem.arg_spec, leaves)[0]


def root_jvp(
    optimality_fn: Callable[..., Any],
    solution: PyTree,
    args: tuple[Any, ...],
    tangents: tuple[Any, ...],
    *,
    solve: SolveName | Callable[..., Any] = "auto",
    symmetric: bool = False,
    throw: bool = False,
    on_failure: OnFailure | None = None,
    residual_tol: float | None = None,
) -> PyTree:
    """Jacobian-vector product of the root ``z*(args)`` of ``F(z, *args) = 0``.

    Computes ``-A^{-1} B tangents`` with ``A = dF/dz`` and ``B = dF/dargs`` at
    ``(solution, args)``: one linear solve, differentiable again.

    Args:
        optimality_fn: ``F(z, *args)``, returning a pytree shaped like ``z``.
        solution: the root ``z*``, a pytree of floating-point tensors.
        args: a tuple of the other arguments of ``F`` (pytrees).
        tangents: a tuple with one entry per entry of ``args``: a pytree shaped like it
            (entries at leaves that are not floating-point tensors are ignored), or
            ``None`` for a zero tangent.
        solve: the linear solver; see :func:`custom_root`. (default: ``"auto"``)
        symmetric: declare ``dF/dz`` symmetric. (default: ``False``)
        throw: raise :class:`functx.NonConvergenceError` instead of warning; see
            :func:`custom_root`. (default: ``False``)
        on_failure: deprecated; see :func:`custom_root`. (default: ``None``)
        residual_tol: the check ``||F(solution, *args)|| <= residual_tol``. (default:
            ``None``: ``sqrt(eps) * (1 + ||z||)``)

    Returns:
        The tangent of the solution, a pytree shaped like ``solution``.

    Example:
        >>> import torch
        >>> from functx.implicit import root_jvp
        >>> F = lambda z, a: z ** 2 - a  # z* = sqrt(a)
        >>> a = torch.tensor(4.0, dtype=torch.float64)
        >>> root_jvp(F, torch.sqrt(a), (a,), (torch.tensor(1.0, dtype=torch.float64),))
        tensor(0.2500, dtype=torch.float64)
    """
    api = "implicit.root_jvp"
    problem, z, d, s = _primitive_problem(
        api, optimality_fn, solution, args, solve, symmetric, throw, on_failure, residual_tol
    )
    if not isinstance(tangents, tuple) or len(tangents) != len(args):
        raise TypeError(
            f"`functx.{api}`: `tangents` must be a tuple with one entry per entry of `args` "
            f"({len(args)}), got {describe(tangents)}."
        )
    d_dot = [t for i, (a, t) in enumerate(zip(args, tangents)) for t in _arg_tangents(a, t, f"tangents[{i}]", api)]
    return tree_unflatten(problem.z_spec, list(problem.jvp(z, d, s, d_dot)))


def _primitive_problem(
    api: str,
    optimality_fn: Any,
    solution: PyTree,
    args: Any,
    solve: Any,
    symmetric: Any,
    throw: Any,
    on_failure: Any,
    residual_tol: Any,
) -> tuple[RootProblem, Tensors, Tensors, Tensors]:
    check_callable(optimality_fn, "optimality_fn", api)
    options = Options.make(api, "optimality_fn", solve, symmetric, throw, on_failure, residual_tol)
    if not isinstance(args, tuple):
        raise TypeError(
            f"`functx.{api}`: `args` must be a tuple of the arguments of `optimality_fn` after z, got {describe(args)}."
        )
    problem = RootProblem(options, optimality_fn, None, False, None, args, {})
    problem.check_signature()
    z_leaves, problem.z_spec = tree_flatten(solution)
    problem.check_z(solution, z_leaves)
    leaves = problem.arg_leaves
    z, d, s = tuple(z_leaves), tuple(leaves[k] for k in problem.diff_pos), tuple(leaves[k] for k in problem.static_pos)
    problem.check_solution(z, d, s)
    return problem, z, d, s


def _arg_tangents(arg: Any, tangent: Any, name: str, api: str) -> list[torch.Tensor | None]:
    """The tangents of the floating-point leaves of ``arg`` (``None`` for a zero tangent)."""
    leaves, spec = tree_flatten(arg)
    diff = [k for k, leaf in enumerate(leaves) if is_differentiable(leaf)]
    if tangent is None:
        return [None] * len(diff)
    like = [leaf if k in diff else None for k, leaf in enumerate(leaves)]
    t_leaves = flatten_like(tangent, spec, like, name=name, api=api, ref="the argument")
    return [t_leaves[k] for k in diff]
