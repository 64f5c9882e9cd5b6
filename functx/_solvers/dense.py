"""Dense solvers: materialise the operator, factor it once (LU or Cholesky), solve many times."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import optree
import torch

from .._tree import NAMESPACE, PyTree
from .._validate import check_bool, check_callable, check_choice, check_tolerance
from ._common import (
    Layout,
    Solution,
    cast_ridge,
    check_ridge,
    conclude,
    default_rtol,
    flat_map,
    shifted,
)

DenseMethod = Literal["lu", "cholesky"]
METHODS: tuple[DenseMethod, ...] = ("lu", "cholesky")
DENSE_HINT = (
    "The matrix is singular (LU), not positive definite (Cholesky), or too ill-conditioned for the dtype: "
    "add a `ridge`, use float64, or use method 'lu' for an indefinite matrix."
)


def _static(**kwargs: Any) -> Any:
    return dataclasses.field(metadata={"pytree_node": False}, **kwargs)


@optree.dataclasses.dataclass(namespace=NAMESPACE)  # type: ignore[call-overload]
class Factorization:
    """A materialised, factored operator; :meth:`solve` reuses the factors for every
    right-hand side. Returned by :func:`factorize`.

    It is a pytree (in the ``"functx"`` namespace) whose leaves are ``matrix``, ``factors``,
    ``pivots`` and ``info``, so it may be returned from :func:`functx.vmap`.

    Attributes:
        matrix: the dense ``n x n`` matrix of ``A + ridge I`` on the raveled space.
        factors: the packed LU factors (``"lu"``) or the lower Cholesky factor.
        pivots: the LU pivots (``None`` for ``"cholesky"``).
        info: 0 if the factorisation succeeded (an int32 0-d tensor); otherwise the
            matrix was singular (LU) or not positive definite (Cholesky).
        method: ``"lu"`` or ``"cholesky"``.
    """

    matrix: torch.Tensor
    factors: torch.Tensor
    pivots: torch.Tensor | None
    info: torch.Tensor
    method: DenseMethod = _static()
    layout: Layout = _static(repr=False)
    rtol: float = _static()
    atol: float = _static()

    def solve(self, b: PyTree, *, adjoint: bool = False, throw: bool = False) -> Solution:
        """Solve ``A x = b`` (or ``A^H x = b`` with ``adjoint=True``) with the stored factors.

        Args:
            b: a right-hand side with the structure, shapes and dtypes of the ``like``
                given to :func:`factorize`.
            adjoint: solve with the conjugate transpose (the transpose for real
                dtypes), as needed for vector-Jacobian products. (default: ``False``)
            throw: raise :class:`functx.NonConvergenceError` (carrying the statistics) when
                the solve did not converge; otherwise ``converged`` reports it. Read in eager
                mode and under every transform, not under ``torch.compile``. (default: ``False``)

        Returns:
            A :class:`Solution`: ``num_steps`` is 0, ``residual_norm`` is
            ``||b - A x||`` computed with the dense matrix, and ``converged`` is True when
            the factorisation succeeded and the normwise backward error is small:
            ``residual_norm <= max(atol, rtol (||A||_F ||x|| + ||b||))``.

        Example:
            >>> import torch
            >>> from functx import solvers
            >>> A = torch.tensor([[2.0, 1.0], [0.0, 4.0]], dtype=torch.float64)
            >>> f = solvers.factorize(lambda x: A @ x, like=torch.zeros(2, dtype=torch.float64))
            >>> f.solve(torch.tensor([3.0, 4.0], dtype=torch.float64)).value
            tensor([1., 1.], dtype=torch.float64)
            >>> f.solve(torch.tensor([2.0, 5.0], dtype=torch.float64), adjoint=True).value
            tensor([1., 1.], dtype=torch.float64)
        """
        api = "solvers.Factorization.solve"
        check_bool(adjoint, "adjoint", api)
        check_bool(throw, "throw", api)
        flat = self.layout.ravel(b, "b", "`b`")
        if self.method == "lu":
            x = torch.linalg.lu_solve(self.factors, self.pivots, flat[:, None], adjoint=adjoint)[:, 0]
        else:  # Hermitian: A^H = A
            x = torch.cholesky_solve(flat[:, None], self.factors)[:, 0]
        matrix = self.matrix.mH if adjoint else self.matrix
        residual_norm = torch.linalg.vector_norm(flat - matrix @ x)
        # Normwise backward error (Rigal & Gaches): x solves a system within relative
        # distance rtol of (A, b). A direct solve is judged by its stability, not by
        # ||b|| alone, which would fail well-solved ill-conditioned systems.
        scale = torch.linalg.matrix_norm(self.matrix.detach()) * torch.linalg.vector_norm(x.detach())
        bound = torch.clamp(self.rtol * (scale + torch.linalg.vector_norm(flat.detach())), min=self.atol)
        converged = (self.info == 0) & torch.isfinite(residual_norm) & (residual_norm <= bound)
        num_steps = torch.zeros_like(self.info, dtype=torch.int64)
        solution = Solution(self.layout.unravel(x), num_steps, residual_norm, converged)
        return conclude(self.layout.api, solution, throw, bound, hint=DENSE_HINT)


def materialize(op: Callable[[torch.Tensor], torch.Tensor], layout: Layout) -> torch.Tensor:
    """The dense matrix of a linear map on flat vectors: its columns are ``op(e_i)``, all
    computed in one ``torch.vmap`` over the identity."""
    eye = torch.eye(layout.size, dtype=layout.dtype, device=layout.device)
    return torch.vmap(op, out_dims=1)(eye)


def factorize(
    matvec: Callable[[PyTree], PyTree],
    like: PyTree,
    *,
    method: DenseMethod = "lu",
    ridge: float | torch.Tensor | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> Factorization:
    """Materialise the operator ``A + ridge I`` as a dense matrix and factor it once.

    The matrix is built from ``n`` matvecs (one ``torch.vmap`` over the columns of the
    identity, ``n`` being the total size of ``like``), then factored in ``O(n^3)``; each
    :meth:`Factorization.solve` then costs ``O(n^2)``. Worth it when ``n`` is small
    (a few thousand) and there are many right-hand sides, or when the system is too
    ill-conditioned for an unpreconditioned Krylov method. Differentiable, and works
    under ``vmap`` (over operators or right-hand sides).

    Args:
        matvec: ``x -> A x``, linear, on pytrees shaped like ``like``; it must be
            ``torch.vmap``-able.
        like: a pytree with the structure, shapes and dtypes of ``x`` and ``b`` (for
            example ``b`` itself); its values are not used.
        method: ``"lu"`` (any nonsingular ``A``, partial pivoting) or ``"cholesky"``
            (Hermitian positive definite ``A``; half the cost). (default: ``"lu"``)
        ridge: shift added to the diagonal: a float or a real 0-d tensor.
            (default: ``None``)
        rtol: relative tolerance of the ``converged`` check in :meth:`Factorization.solve`,
            on the backward error ``||b - A x|| / (||A||_F ||x|| + ||b||)``.
            (default: ``None``, by dtype: 1e-12 for float64, 1e-5 for float32)
        atol: absolute tolerance of that check. (default: ``None``, 0)

    Returns:
        A :class:`Factorization`; call ``.solve(b)`` (or ``.solve(b, adjoint=True)``).

    Example:
        >>> import torch
        >>> from functx import solvers
        >>> K = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> f = solvers.factorize(lambda x: K @ x, like=torch.zeros(2, dtype=torch.float64), method="cholesky")
        >>> bs = torch.tensor([[3.0, 3.0], [1.0, -1.0]], dtype=torch.float64)
        >>> [f.solve(b).value.round(decimals=8) for b in bs]
        [tensor([1., 1.], dtype=torch.float64), tensor([ 1., -1.], dtype=torch.float64)]
    """
    api = "solvers.factorize"
    check_callable(matvec, "matvec", api)
    method = check_choice(method, "method", METHODS, api)
    return _factorize(matvec, like, method, ridge, rtol, atol, api, "like")


def _factorize(
    matvec: Any, like: PyTree, method: DenseMethod, ridge: Any, rtol: Any, atol: Any, api: str, name: str
) -> Factorization:
    layout = Layout(like, name, api)
    rtol = check_tolerance(rtol, "rtol", api, default_rtol(layout.dtype))
    atol = check_tolerance(atol, "atol", api, 0.0)
    ridge = cast_ridge(check_ridge(ridge, api), layout)
    matrix = materialize(shifted(flat_map(matvec, layout, layout, "matvec", "x"), ridge), layout)
    if method == "lu":
        factors, pivots, info = torch.linalg.lu_factor_ex(matrix)
    else:
        factors, info = torch.linalg.cholesky_ex(matrix)
        pivots = None
    if name == "like":  # later right-hand sides are checked against `like`, for `Factorization.solve`
        layout.api = "solvers.Factorization.solve"
    return Factorization(matrix, factors, pivots, info, method, layout, rtol, atol)


def _direct(
    matvec: Any, b: PyTree, x0: PyTree, method: DenseMethod, ridge: Any, rtol: Any, atol: Any, throw: Any
) -> Solution:
    api = f"solvers.{method}"
    check_callable(matvec, "matvec", api)
    check_bool(throw, "throw", api)
    if x0 is not None:  # accepted for protocol compatibility; checked, then unused
        Layout(b, "b", api).check(x0, "x0", "`x0`")
    return _factorize(matvec, b, method, ridge, rtol, atol, api, "b").solve(b, throw=throw)


def lu(
    matvec: Callable[[PyTree], PyTree],
    b: PyTree,
    x0: PyTree = None,
    *,
    ridge: float | torch.Tensor | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    throw: bool = False,
) -> Solution:
    """Solve ``(A + ridge I) x = b`` densely: materialise ``A``, LU-factor it, solve.

    ``lu(matvec, b)`` is ``factorize(matvec, b, method="lu").solve(b)``; use
    :func:`factorize` to reuse the factors across right-hand sides.

    Args:
        matvec: ``x -> A x``, linear and ``torch.vmap``-able, on pytrees shaped like ``b``.
        b: the right-hand side, a pytree of floating-point (or complex) tensors.
        x0: ignored (accepted so that every solver has the same signature).
            (default: ``None``)
        ridge: shift added to the diagonal: a float or a real 0-d tensor.
            (default: ``None``)
        rtol: relative tolerance of the ``converged`` check, on the backward error
            ``||b - A x|| / (||A||_F ||x|| + ||b||)``.
            (default: ``None``, by dtype: 1e-12 for float64, 1e-5 for float32)
        atol: absolute tolerance of that check. (default: ``None``, 0)
        throw: raise :class:`functx.NonConvergenceError` (carrying the statistics) when
            the solve did not converge; otherwise ``converged`` reports it. Read in eager
            mode and under every transform, not under ``torch.compile``. (default: ``False``)

    Returns:
        A :class:`Solution` with ``num_steps`` 0; ``converged`` is False if ``A`` is
        exactly singular or the backward error exceeds ``rtol``.

    Example:
        >>> import torch
        >>> from functx import solvers
        >>> A = torch.tensor([[0.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
        >>> sol = solvers.lu(lambda x: A @ x, torch.tensor([1.0, 4.0], dtype=torch.float64))
        >>> sol.value, bool(sol.converged)
        (tensor([2., 1.], dtype=torch.float64), True)
    """
    return _direct(matvec, b, x0, "lu", ridge, rtol, atol, throw)


def cholesky(
    matvec: Callable[[PyTree], PyTree],
    b: PyTree,
    x0: PyTree = None,
    *,
    ridge: float | torch.Tensor | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    throw: bool = False,
) -> Solution:
    """Solve ``(A + ridge I) x = b`` densely for Hermitian positive definite ``A``:
    materialise ``A``, Cholesky-factor it, solve.

    ``cholesky(matvec, b)`` is ``factorize(matvec, b, method="cholesky").solve(b)``.
    If ``A + ridge I`` is not positive definite, ``converged`` is False.

    Args:
        matvec: ``x -> A x``, linear, symmetric and ``torch.vmap``-able, on pytrees shaped
            like ``b``.
        b: the right-hand side, a pytree of floating-point (or complex) tensors.
        x0: ignored (accepted so that every solver has the same signature).
            (default: ``None``)
        ridge: shift added to the diagonal: a float or a real 0-d tensor.
            (default: ``None``)
        rtol: relative tolerance of the ``converged`` check, on the backward error
            ``||b - A x|| / (||A||_F ||x|| + ||b||)``.
            (default: ``None``, by dtype: 1e-12 for float64, 1e-5 for float32)
        atol: absolute tolerance of that check. (default: ``None``, 0)
        throw: raise :class:`functx.NonConvergenceError` (carrying the statistics) when
            the solve did not converge; otherwise ``converged`` reports it. Read in eager
            mode and under every transform, not under ``torch.compile``. (default: ``False``)

    Returns:
        A :class:`Solution` with ``num_steps`` 0.

    Example:
        >>> import torch
        >>> from functx import solvers
        >>> A = torch.tensor([[4.0, 2.0], [2.0, 3.0]], dtype=torch.float64)
        >>> b = {"x": torch.tensor([6.0, 5.0], dtype=torch.float64)}
        >>> sol = solvers.cholesky(lambda x: {"x": A @ x["x"]}, b)
        >>> sol.value["x"].round(decimals=8)
        tensor([1., 1.], dtype=torch.float64)
    """
    return _direct(matvec, b, x0, "cholesky", ridge, rtol, atol, throw)
