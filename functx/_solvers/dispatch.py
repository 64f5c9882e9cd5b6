"""``solve``: one entry point that picks a solver by name or by the structure of ``A``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal, get_args

from .._tree import PyTree
from .._validate import check_bool, check_callable, check_choice, fail
from ._common import Solution
from .bicgstab import bicgstab
from .cg import cg, normal_cg
from .dense import cholesky, lu
from .gmres import gmres
from .minres import minres

SOLVERS: dict[str, Callable[..., Solution]] = {
    "cg": cg,
    "minres": minres,
    "gmres": gmres,
    "bicgstab": bicgstab,
    "normal_cg": normal_cg,
    "lu": lu,
    "cholesky": cholesky,
}
Method = Literal["auto", "cg", "minres", "gmres", "bicgstab", "normal_cg", "lu", "cholesky"]
METHODS: tuple[Method, ...] = get_args(Method)
assert METHODS == ("auto", *SOLVERS)
OPTIONS = {
    name: [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
    for name, fn in SOLVERS.items()
}


def auto_method(symmetric: bool, positive_definite: bool) -> str:
    """CG for Hermitian positive definite operators, MINRES for symmetric ones, else GMRES."""
    if positive_definite:
        return "cg"
    return "minres" if symmetric else "gmres"


def solve(
    matvec: Callable[[PyTree], PyTree],
    b: PyTree,
    x0: PyTree = None,
    *,
    method: Method = "auto",
    symmetric: bool = False,
    positive_definite: bool = False,
    **options: Any,
) -> Solution:
    """Solve ``A x = b`` with the solver named by ``method``, or chosen from the structure of ``A``.

    With ``method="auto"``: :func:`cg` if ``positive_definite`` (a Hessian at a minimum, a
    Gram matrix), else :func:`minres` if ``symmetric`` (a Hessian at a saddle, a KKT
    system), else :func:`gmres` (Jacobians of fixed-point maps, general operators).

    Args:
        matvec: ``x -> A x``, linear, on pytrees shaped like ``b``.
        b: the right-hand side, a pytree of floating-point (or complex) tensors.
        x0: initial guess. (default: ``None``)
        method: ``"auto"``, ``"cg"``, ``"minres"``, ``"gmres"``, ``"bicgstab"``,
            ``"normal_cg"``, ``"lu"`` or ``"cholesky"``. (default: ``"auto"``)
        symmetric: whether ``A`` is symmetric (Hermitian); used by ``"auto"`` only.
            (default: ``False``)
        positive_definite: whether ``A`` is Hermitian positive definite (implies
            ``symmetric``); used by ``"auto"`` only. (default: ``False``)
        **options: keyword options of the chosen solver (``rtol``, ``atol``,
            ``max_iter``, ``preconditioner``, ``ridge``, ``restart``, ``rmatvec``,
            ``throw``...).

    Returns:
        The chosen solver's :class:`Solution`.

    Example:
        >>> import torch
        >>> from functx import solvers
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> b = torch.tensor([3.0, 3.0], dtype=torch.float64)
        >>> solvers.solve(lambda x: A @ x, b, positive_definite=True).value
        tensor([1., 1.], dtype=torch.float64)
        >>> solvers.solve(lambda x: A @ x, b, method="lu", ridge=1.0).value
        tensor([0.7500, 0.7500], dtype=torch.float64)
    """
    api = "solvers.solve"
    check_callable(matvec, "matvec", api)
    check_bool(symmetric, "symmetric", api)
    check_bool(positive_definite, "positive_definite", api)
    chosen: str = check_choice(method, "method", METHODS, api)
    if chosen == "auto":
        chosen = auto_method(symmetric, positive_definite)
    unknown = sorted(set(options) - set(OPTIONS[chosen]))
    if unknown:
        raise fail(
            api, f"method {chosen!r} does not accept option(s) {unknown}; it accepts {OPTIONS[chosen]}.", TypeError
        )
    return SOLVERS[chosen](matvec, b, x0, **options)
