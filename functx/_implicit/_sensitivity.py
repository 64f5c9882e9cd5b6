"""``implicit_jacobian`` and ``implicit_hessian``: sensitivity_torch's API, matrix-free.

Both are compositions of functx transforms with one function, :func:`implicit_solution`,
that returns the given solution ``z`` of ``k_fn(z, *params) = 0`` with the implicit
derivatives of :class:`~._root.Root` attached. So every quantity is exact at every order
(the second-order terms that sensitivity_torch assembles by hand come out of the
transforms), matrix-free (one linear solve per product, batched under ``vmap``),
pytree-aware and vmappable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import _grad, _hessian, _jacobian, _vjp_jvp
from .._solvers._functorch import forward_over_forward_ok
from .._solvers.linear_solve import OnFailure, SolveName
from .._tree import (
    PyTree,
    flatten_float,
    flatten_like,
    tree_flatten,
    tree_structure,
    tree_unflatten,
    tree_vdot,
)
from .._validate import check_callable, describe
from ._problem import Options, RootProblem, call_root


def implicit_solution(k_fn: Callable[..., Any], z: PyTree, params: tuple[Any, ...], options: Options) -> PyTree:
    """``z`` (the root of ``k_fn(., *params)``) as a differentiable function of ``params``."""
    return call_root(RootProblem(options, k_fn, _given, False, z, params, {}))


def _given(init: PyTree, *params: Any) -> PyTree:
    return init


def implicit_jacobian(
    k_fn: Callable[..., Any],
    z: PyTree,
    *params: Any,
    Dg: PyTree = None,
    jvp_vec: Any = None,
    solve: SolveName | Callable[..., Any] = "auto",
    symmetric: bool = False,
    throw: bool = False,
    on_failure: OnFailure | None = None,
    residual_tol: float | None = None,
) -> Any:
    """Derivatives of the solution ``z*(params)`` of ``k_fn(z, *params) = 0`` (sensitivity_torch).

    Depending on the arguments, one of:

    * neither ``Dg`` nor ``jvp_vec``: the Jacobian ``dz/dp`` for each parameter, with the
      layout of :func:`functx.jacrev` (z's structure of p's structure, each leaf
      ``z_leaf.shape + p_leaf.shape``), by forward or reverse mode, whichever needs fewer
      linear solves;
    * ``Dg`` (shaped like ``z``): the vector-Jacobian product ``Dg^T dz/dp`` for each
      parameter, shaped like it (one adjoint solve);
    * ``jvp_vec`` (one tangent per parameter): the product ``dz/dp_i jvp_vec_i`` for each
      parameter separately, shaped like ``z`` (one tangent solve each).

    Args:
        k_fn: ``k_fn(z, *params)``, returning a pytree shaped like ``z`` that vanishes at
            the solution (for an argmin, the gradient of the inner objective).
        z: the solution, a pytree of floating-point tensors.
        *params: the parameters, pytrees of floating-point tensors.
        Dg: the left vector of a VJP, shaped like ``z``. (default: ``None``)
        jvp_vec: the right vectors of JVPs: a tuple with one tangent per parameter (a
            single tangent when there is one parameter). (default: ``None``)
        solve: the linear solver, a name or a callable ``solve(matvec, b)``; see
            :func:`custom_root`. (default: ``"auto"``)
        symmetric: declare ``dk/dz`` symmetric (``k_fn`` is a gradient): CG by default.
            (default: ``False``)
        throw: when ``z`` is not a root or a linear solve does not converge, raise
            :class:`functx.NonConvergenceError` instead of warning with
            :class:`functx.NonConvergenceWarning`. (default: ``False``)
        on_failure: deprecated; see :func:`functx.implicit.custom_root`. (default: ``None``)
        residual_tol: the check ``||k_fn(z, *params)|| <= residual_tol``. (default:
            ``None``: ``sqrt(eps) * (1 + ||z||)``)

    Returns:
        The result for the one parameter, or a tuple with one result per parameter.

    Example:
        >>> import torch
        >>> from functx.implicit import implicit_jacobian
        >>> k = lambda z, a: z ** 2 - a  # z* = sqrt(a), dz/da = 1 / (2 sqrt(a))
        >>> a = torch.tensor([4.0, 9.0], dtype=torch.float64)
        >>> implicit_jacobian(k, torch.sqrt(a), a)
        tensor([[0.2500, 0.0000],
                [0.0000, 0.1667]], dtype=torch.float64)
    """
    api = "implicit.implicit_jacobian"
    _, zfun = _setup(api, k_fn, z, params, solve, symmetric, throw, on_failure, residual_tol)
    if Dg is not None and jvp_vec is not None:
        raise ValueError(f"`functx.{api}`: pass at most one of `Dg` (for a VJP) and `jvp_vec` (for JVPs).")
    if Dg is not None:
        _check_like(Dg, z, "Dg", api, "`z`")
        results = _vjp_jvp.vjp(zfun, *params)[1](Dg)
    elif jvp_vec is not None:
        tangents = _per_param(jvp_vec, params, "jvp_vec", api)
        results = tuple(_jvp_one(zfun, params, i, v) for i, v in enumerate(tangents))
    else:
        results = _jacobian_per_param(zfun, z, params)
    return results[0] if len(params) == 1 else results


def implicit_hessian(
    k_fn: Callable[..., Any],
    z: PyTree,
    *params: Any,
    Dg: PyTree = None,
    Hg: Any = None,
    jvp_vec: Any = None,
    solve: SolveName | Callable[..., Any] = "auto",
    symmetric: bool = False,
    throw: bool = False,
    on_failure: OnFailure | None = None,
    residual_tol: float | None = None,
) -> tuple[Any, Any]:
    """Second derivatives through the solution ``z*(params)`` of ``k_fn(z, *params) = 0``.

    Depending on the arguments (sensitivity_torch's semantics), for each parameter ``p``:

    * no ``Dg``: ``(dz/dp, d2z/dp2)``, the Jacobian (layout of :func:`implicit_jacobian`)
      and the second derivative (z's structure of p's structure of p's structure, each
      leaf ``z_leaf.shape + p_leaf.shape + p_leaf.shape``);
    * ``Dg`` (and optionally ``Hg``): the gradient and Hessian with respect to ``p`` of an
      outer objective ``g(z*(p))`` whose gradient and Hessian with respect to ``z`` at ``z``
      are ``Dg`` and ``Hg`` (``Hg=None``: ``g`` is linear). Shapes: ``p`` and
      ``p.shape + p.shape`` (pytrees: :func:`functx.hessian`'s layout);
    * ``Dg`` and ``jvp_vec``: the directional derivative ``<grad, v>`` (a scalar) and the
      Hessian-vector product ``H v`` (shaped like ``p``), without forming ``H``.

    Only the diagonal blocks (each parameter with itself) are computed, as in
    sensitivity_torch; for mixed blocks use :func:`functx.hessian` on
    :func:`custom_root`.

    Args:
        k_fn: ``k_fn(z, *params)``, returning a pytree shaped like ``z`` that vanishes at
            the solution.
        z: the solution, a pytree of floating-point tensors.
        *params: the parameters, pytrees of floating-point tensors.
        Dg: gradient of the outer objective with respect to ``z``, shaped like ``z``.
            (default: ``None``)
        Hg: Hessian of the outer objective with respect to ``z``: a callable
            ``v -> Hg v`` on pytrees shaped like ``z``, or a dense Hessian in
            :func:`functx.hessian`'s layout (a tensor of shape ``z.shape + z.shape`` when
            ``z`` is a tensor). (default: ``None``)
        jvp_vec: the tangents for Hessian-vector products: a tuple with one per parameter
            (a single tangent when there is one parameter); requires ``Dg``.
            (default: ``None``)
        solve: the linear solver; see :func:`custom_root`. (default: ``"auto"``)
        symmetric: declare ``dk/dz`` symmetric. (default: ``False``)
        throw: raise :class:`functx.NonConvergenceError` instead of warning.
            (default: ``False``)
        on_failure: deprecated; see :func:`functx.implicit.custom_root`. (default: ``None``)
        residual_tol: the check ``||k_fn(z, *params)|| <= residual_tol``. (default:
            ``None``: ``sqrt(eps) * (1 + ||z||)``)

    Returns:
        A pair ``(first, second)``; each is the result for the one parameter, or a tuple
        with one result per parameter.

    Example:
        >>> import torch
        >>> from functx.implicit import implicit_hessian
        >>> k = lambda z, a: z ** 2 - a  # z* = sqrt(a): dz/da = a^(-1/2) / 2, d2z/da2 = -a^(-3/2) / 4
        >>> a = torch.tensor(4.0, dtype=torch.float64)
        >>> first, second = implicit_hessian(k, torch.sqrt(a), a)
        >>> round(first.item(), 6), round(second.item(), 6)
        (0.25, -0.03125)
    """
    api = "implicit.implicit_hessian"
    _, zfun = _setup(api, k_fn, z, params, solve, symmetric, throw, on_failure, residual_tol)
    if Dg is None:
        if Hg is not None or jvp_vec is not None:
            raise ValueError(f"`functx.{api}`: `Hg` and `jvp_vec` need `Dg` (the outer objective's gradient).")
        first = _jacobian_per_param(zfun, z, params)
        second = tuple(_second_derivative(_one(zfun, params, i), p, z) for i, p in enumerate(params))
    else:
        _check_like(Dg, z, "Dg", api, "`z`")
        outer = _outer_objective(Dg, _hg_matvec(Hg, z, api), z)
        objectives = [(lambda p, i=i: outer(_one(zfun, params, i)(p))) for i in range(len(params))]
        if jvp_vec is None:
            first = tuple(_grad.grad(g)(p) for g, p in zip(objectives, params))
            second = tuple(_hessian.hessian(g)(p) for g, p in zip(objectives, params))
        else:
            tangents = _per_param(jvp_vec, params, "jvp_vec", api)
            pairs = [_hessian.hvp(g, (p,), (v,)) for g, p, v in zip(objectives, params, tangents)]
            first = tuple(tree_vdot(grads[0], v) for (grads, _), v in zip(pairs, tangents))
            second = tuple(products[0] for _, products in pairs)
    if len(params) == 1:
        return first[0], second[0]
    return first, second


# --------------------------------------------------------------------------------------
# Helpers.


def _setup(
    api: str,
    k_fn: Any,
    z: PyTree,
    params: tuple[Any, ...],
    solve: Any,
    symmetric: Any,
    throw: Any,
    on_failure: Any,
    residual_tol: Any,
) -> tuple[Options, Callable[..., PyTree]]:
    check_callable(k_fn, "k_fn", api)
    if not params:
        raise TypeError(f"`functx.{api}`: pass at least one parameter after `z`.")
    _check_float_tree(z, "z", api)
    for i, p in enumerate(params):
        _check_float_tree(p, f"params[{i}]", api)
    options = Options.make(api, "k_fn", solve, symmetric, throw, on_failure, residual_tol)
    return options, lambda *ps: implicit_solution(k_fn, z, ps, options)


def _check_float_tree(tree: PyTree, name: str, api: str) -> None:
    flatten_float(tree, name=name, api=api, nonempty=True, hint="Close over non-differentiable data in `k_fn` instead.")


def _check_like(tree: PyTree, like: PyTree, name: str, api: str, ref: str) -> None:
    leaves, spec = tree_flatten(like)
    flatten_like(tree, spec, leaves, name=name, api=api, ref=ref)


def _per_param(vecs: Any, params: tuple[Any, ...], name: str, api: str) -> tuple[Any, ...]:
    """One tangent per parameter; a lone tangent is accepted for a single parameter."""
    if len(params) == 1 and tree_structure(vecs) == tree_structure(params[0]):
        vecs = (vecs,)
    if not isinstance(vecs, (tuple, list)) or len(vecs) != len(params):
        raise ValueError(
            f"`functx.{api}`: `{name}` must be a tuple with one tangent per parameter "
            f"({len(params)}), got {describe(vecs)}."
        )
    for i, (v, p) in enumerate(zip(vecs, params)):
        _check_like(v, p, f"{name}[{i}]", api, f"`params[{i}]`")
    return tuple(vecs)


def _one(zfun: Callable[..., PyTree], params: tuple[Any, ...], i: int) -> Callable[[Any], PyTree]:
    """``zfun`` as a function of parameter ``i`` alone."""
    return lambda p: zfun(*params[:i], p, *params[i + 1 :])


def _jvp_one(zfun: Callable[..., PyTree], params: tuple[Any, ...], i: int, v: Any) -> PyTree:
    return _vjp_jvp.jvp(_one(zfun, params, i), (params[i],), (v,))[1]


def _size(tree: PyTree) -> int:
    return sum(leaf.numel() for leaf in tree_flatten(tree)[0])


def _jacobian_per_param(zfun: Callable[..., PyTree], z: PyTree, params: tuple[Any, ...]) -> tuple[Any, ...]:
    """``dz/dp_i`` for each parameter: forward mode when the parameters are smaller than ``z``."""
    argnums = tuple(range(len(params)))
    engine = _jacobian.jacfwd if sum(_size(p) for p in params) <= _size(z) else _jacobian.jacrev
    jac = engine(zfun, argnums=argnums)(*params)
    z_spec = tree_structure(z)
    rows = z_spec.flatten_up_to(jac)  # one tuple (over parameters) per leaf of z
    return tuple(tree_unflatten(z_spec, [row[i] for row in rows]) for i in argnums)


def _second_derivative(f: Callable[[Any], PyTree], p: Any, z: PyTree) -> PyTree:
    """``d2 f/dp2`` (f vector-valued): forward over forward when ``p`` is small."""
    if _size(p) <= _size(z) and forward_over_forward_ok():
        return _jacobian.jacfwd(_jacobian.jacfwd(f))(p)
    return _hessian.hessian(f, mode="rev-rev")(p)


def _outer_objective(Dg: PyTree, Hg: Callable[[PyTree], PyTree] | None, z: PyTree) -> Callable[[PyTree], torch.Tensor]:
    """``g(z') = <Dg, z'> + 1/2 <z' - z, Hg (z' - z)>``: exact first and second derivatives at ``z``."""
    z0 = tree_flatten(z)[0]
    spec = tree_structure(z)

    def g(z_new: PyTree) -> torch.Tensor:
        value = tree_vdot(Dg, z_new)
        if Hg is None:
            return value
        dz = tree_unflatten(spec, [a - b for a, b in zip(tree_flatten(z_new)[0], z0)])
        return value + 0.5 * tree_vdot(dz, Hg(dz))

    return g


def _hg_matvec(Hg: Any, z: PyTree, api: str) -> Callable[[PyTree], PyTree] | None:
    """``Hg`` as ``v -> Hg v``: a callable as is, a dense Hessian (functx layout) contracted."""
    if Hg is None or callable(Hg):
        return Hg
    spec = tree_structure(z)
    z_leaves = tree_flatten(z)[0]
    try:
        rows = spec.flatten_up_to(Hg)
        blocks = [tree_flatten(row)[0] for row in rows]
        ok = all(tree_structure(row) == spec for row in rows)
    except (ValueError, TypeError):
        ok = False
    if ok:
        for i, zi in enumerate(z_leaves):
            for j, zj in enumerate(z_leaves):
                ok = ok and isinstance(blocks[i][j], torch.Tensor) and blocks[i][j].shape == zi.shape + zj.shape
    if not ok:
        raise ValueError(
            f"`functx.{api}`: `Hg` must be a callable `v -> Hg v` or a dense Hessian in functx.hessian's "
            f"layout (z's structure of z's structure, leaves of shape z_i.shape + z_j.shape), got "
            f"{describe(Hg)}."
        )

    def matvec(v: PyTree) -> PyTree:
        v_leaves = tree_flatten(v)[0]
        out = [
            sum(torch.tensordot(blocks[i][j], vj, dims=vj.dim()) for j, vj in enumerate(v_leaves))
            for i in range(len(z_leaves))
        ]
        return tree_unflatten(spec, out)

    return matvec
