"""``(op + δI)^{-1}`` for any symmetric operator, by a Krylov solve per product (CG batched over columns)."""

from __future__ import annotations

from typing import Any

import torch

from .._core import plain_eager
from .._errors import report_nonconvergence
from .._solvers._common import default_max_iter, default_rtol
from .._validate import (
    api_name,
    check_bool,
    check_choice,
    check_float,
    check_optional_int,
    check_scalar_tensor_or_float,
    describe,
)
from ._base import CurvatureOperatorBase
from ._params import Layout

_API = "curvature.InverseOperator"
_METHODS = ("cg", "minres")


class InverseOperator(CurvatureOperatorBase):
    """The damped inverse ``(op + δI)^{-1}`` of any symmetric operator, matrix-free.

    Each product ``Hi @ v`` solves ``(op + δI) x = v`` by conjugate gradients (``op + δI``
    positive definite) or :func:`functx.solvers.minres` (symmetric, possibly indefinite);
    it never returns an unconverged answer silently. For a matrix ``v`` of shape
    ``(P, K)``, CG runs on the ``K`` columns together: one product ``op @ D`` with the
    ``(P, K')`` matrix of the ``K'`` columns still running per iteration (a data operator
    makes one data pass for all of them), each column with its own step sizes and stopping
    test (a converged column is frozen); MINRES solves one column at a time. Works for
    ``H``, ``G``, ``F``, the Kronecker operators, their lazy combinations (``G + 0.1 * H``),
    a dense symmetric tensor, or any object with ``@`` and ``shape`` (applied column by
    column).

    Args:
        op: the operator: a functx.curvature operator, a square symmetric tensor, or an
            object with ``shape == (P, P)`` and ``op @ x`` for ``x`` of shape ``(P,)``
            (``dtype`` and ``device`` are read when present).
        damping: ``δ >= 0``, a float or a 0-d tensor. (default: 1e-3)
        method: ``"cg"`` or ``"minres"``. (default: ``"cg"``)
        preconditioner: an operator ``M ≈ (op + δI)^{-1}`` (symmetric positive definite), used
            as ``M @ r``; typically ``K.inverse(δ)`` of a
            :class:`~functx.curvature.KFACOperator`. (default: ``None``)
        rtol: relative tolerance of each solve, ``||v - (op + δI) x|| <= rtol ||v||``.
            (default: ``None``, the solver's: 1e-12 for float64, 1e-5 for float32)
        max_iter: most iterations per solve. (default: ``None``, the solver's)
        throw: raise :class:`functx.NonConvergenceError` when a solve does not converge;
            ``False`` warns with :class:`functx.NonConvergenceWarning` and returns the last
            iterate. (default: ``True``)

    Attributes:
        converged, num_steps, num_matvecs, residual_norm: the statistics of the last product
            (all columns converged; the most iterations of a column; column products with
            ``op``, summed over the columns and including the final true-residual check; the
            largest final residual norm ``||v_k - (op + δI) x_k||``); ``None`` before any
            product.

    Example:
        >>> import torch
        >>> import functx.curvature as fc
        >>> M = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> Hi = fc.InverseOperator(M, damping=0.5)
        >>> x = Hi @ torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> torch.allclose((M + 0.5 * torch.eye(2, dtype=M.dtype)) @ x, torch.tensor([1.0, 2.0], dtype=M.dtype))
        True
        >>> Hi.converged, Hi.num_steps
        (True, 2)
    """

    def __init__(
        self,
        op: Any,
        damping: float | torch.Tensor = 1e-3,
        method: str = "cg",
        preconditioner: Any = None,
        rtol: float | None = None,
        max_iter: int | None = None,
        throw: bool = True,
    ) -> None:
        self._api = f"functx.{_API}"
        self._op = op
        self._layout = _layout_of(op)
        self._num_data = getattr(op, "num_data", 1)
        self._damping = check_scalar_tensor_or_float(damping, "damping", _API)
        self._method = check_choice(method, "method", _METHODS, _API)
        if preconditioner is not None and not hasattr(preconditioner, "__matmul__"):
            raise TypeError(
                f"{api_name(_API)}: `preconditioner` must be None or an operator with `@`, got {describe(preconditioner)}."
            )
        if preconditioner is not None and hasattr(preconditioner, "shape"):
            if tuple(preconditioner.shape) != self.shape:
                raise ValueError(
                    f"{api_name(_API)}: `preconditioner` must have the shape of `op`, {self.shape}, "
                    f"got {tuple(preconditioner.shape)}."
                )
        self._preconditioner = preconditioner
        self._rtol = None if rtol is None else check_float(rtol, "rtol", _API, nonnegative=True)
        self._max_iter = check_optional_int(max_iter, "max_iter", _API, minimum=0)
        self._throw = check_bool(throw, "throw", _API)
        self._stats: dict[str, Any] = dict.fromkeys(("converged", "num_steps", "num_matvecs", "residual_norm"))

    # -- statistics of the last product ------------------------------------------------------

    @property
    def converged(self) -> bool | None:
        """Whether every solve of the last product converged."""
        return self._stats["converged"]

    @property
    def num_steps(self) -> int | None:
        """The most iterations any column of the last product took."""
        return self._stats["num_steps"]

    @property
    def num_matvecs(self) -> int | None:
        """The products with ``op`` the last product took (all columns)."""
        return self._stats["num_matvecs"]

    @property
    def residual_norm(self) -> float | None:
        """The largest final residual norm ``||v - (op + δI) x||`` of the last product."""
        return self._stats["residual_norm"]

    # -- products ----------------------------------------------------------------------------

    def __matmul__(self, v: Any) -> Any:
        if self._layout.keys == [_FLAT] and not isinstance(v, (torch.Tensor, CurvatureOperatorBase)):
            raise TypeError(
                f"{api_name(_API)}: `v` must be a tensor of shape {(self.shape[0],)} or ({self.shape[0]}, K) "
                f"(a pytree needs a functx.curvature operator), got {describe(v)}."
            )
        return super().__matmul__(v)

    def _check_v(self, v: torch.Tensor) -> None:
        if isinstance(self._op, CurvatureOperatorBase):
            self._op._check_v(v)
        if not plain_eager(v) or torch.compiler.is_compiling():
            raise TypeError(
                f"{api_name(_API)}: products run Krylov solves with data-dependent stopping; they "
                f"cannot run inside a functx/torch.func transform or torch.compile (got a transformed `v`)."
            )

    def _apply(self, V: torch.Tensor) -> torch.Tensor:
        if self._method == "cg":
            X, stats = self._batched_cg(V.T)
        else:
            X, stats = self._minres_columns(V)
        self._stats = stats
        if not stats["converged"]:
            report_nonconvergence(
                _API,
                f"{self._method} did not reach the tolerance within {stats['num_steps']} iterations (largest "
                f"residual norm {stats['residual_norm']:.3g}); raise `max_iter`, add a `preconditioner` or "
                f"increase `damping`.",
                stats,
                self._throw,
                stacklevel=5,
            )
        return X.T

    def _product(self, A: Any, X: torch.Tensor) -> torch.Tensor:
        """``A @ X`` for ``X`` of shape ``(P, K)``: one matrix product for a functx operator or a
        tensor (a data operator makes one data pass), column by column for a foreign operator
        (which promises ``@`` on ``(P,)`` only)."""
        if isinstance(A, (torch.Tensor, CurvatureOperatorBase)):
            return A @ X
        return torch.stack([A @ x for x in X.T], dim=1)

    def _batched_cg(self, B: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Preconditioned CG on the ``K`` columns of ``B`` (``(P, K)``) at once: one product
        ``op @ P_active`` per iteration over the columns still running, each column with its
        own step sizes and stopping test ``||r_k|| <= rtol ||b_k||`` (a converged column is
        frozen), then the true residuals ``B - (op + δI) X`` in one more product."""
        P, K = B.shape
        rtol = default_rtol(B.dtype) if self._rtol is None else self._rtol
        max_iter = default_max_iter(P) if self._max_iter is None else self._max_iter
        tol = torch.linalg.vector_norm(B.detach(), dim=0) * rtol
        damping = self._damping.to(B.dtype) if isinstance(self._damping, torch.Tensor) else self._damping

        def shifted(X: torch.Tensor) -> torch.Tensor:
            return self._product(self._op, X) + damping * X

        def precondition(R: torch.Tensor) -> torch.Tensor:
            return R if self._preconditioner is None else self._product(self._preconditioner, R)

        X, R = torch.zeros_like(B), B
        Z = precondition(R)
        D, rz = Z, (R * Z).sum(0)
        active = torch.linalg.vector_norm(R.detach(), dim=0) > tol
        steps = torch.zeros(K, dtype=torch.int64, device=B.device)
        products = 0
        for _ in range(max_iter):
            idx = active.nonzero().flatten()
            if len(idx) == 0:
                break
            AD = torch.zeros_like(B).index_copy(1, idx, shifted(D[:, idx]))
            products += len(idx)
            dAd = (D * AD).sum(0)
            ok = active & (dAd != 0)
            alpha = torch.where(ok, rz / torch.where(ok, dAd, 1.0), 0.0)
            X, R = X + alpha * D, R - alpha * AD
            Z = precondition(R)
            rz_new = (R * Z).sum(0)
            ok = active & (rz != 0)
            beta = torch.where(ok, rz_new / torch.where(ok, rz, 1.0), 0.0)
            D = torch.where(active, Z + beta * D, D)
            rz = torch.where(active, rz_new, rz)
            steps += active.to(torch.int64)
            active = active & (torch.linalg.vector_norm(R.detach(), dim=0) > tol)
        residual = torch.linalg.vector_norm((B - shifted(X)).detach(), dim=0)
        products += K
        stats = {
            "converged": bool((residual <= tol).all()),
            "num_steps": int(steps.max()),
            "num_matvecs": products,
            "residual_norm": float(residual.max()),
        }
        return X, stats

    def _minres_columns(self, V: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """One :func:`functx.solvers.minres` solve per row of ``V`` (``(K, P)``)."""
        from .. import solvers

        count = [0]

        def matvec(x: torch.Tensor) -> torch.Tensor:
            count[0] += 1
            return self._op @ x

        precondition = None if self._preconditioner is None else (lambda r: self._preconditioner @ r)
        rows, steps, residuals, converged = [], 0, [], True
        for v in V:
            sol = solvers.minres(
                matvec, v, rtol=self._rtol, max_iter=self._max_iter, preconditioner=precondition, ridge=self._damping
            )
            rows.append(sol.value)
            steps = max(steps, int(sol.num_steps.detach()))
            residuals.append(float(sol.residual_norm.detach()))
            converged = converged and bool(sol.converged.detach())
        stats = {"converged": converged, "num_steps": steps, "num_matvecs": count[0], "residual_norm": max(residuals)}
        return torch.stack(rows, dim=1), stats

    def __repr__(self) -> str:
        return f"InverseOperator({self._op!r}, damping={self._damping!r}, method={self._method!r})"


_FLAT = "v"


def _layout_of(op: Any) -> Layout:
    """The operator's own flattening, or one flat vector ``"v"`` for a tensor or a foreign operator."""
    if isinstance(op, CurvatureOperatorBase):
        return op._layout
    if not hasattr(op, "__matmul__") or not hasattr(op, "shape"):
        raise TypeError(
            f"{api_name(_API)}: `op` must be an operator with `@` and `shape` (or a square tensor), got {describe(op)}."
        )
    shape = tuple(op.shape)
    if len(shape) != 2 or shape[0] != shape[1] or not all(isinstance(s, int) for s in shape):
        raise ValueError(f"{api_name(_API)}: `op` must be square, (P, P), got shape {shape}.")
    dtype = getattr(op, "dtype", torch.get_default_dtype())
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{api_name(_API)}: `op` must have a real floating-point dtype, got {dtype!r}.")
    device = torch.device(getattr(op, "device", "cpu"))
    return Layout({_FLAT: torch.empty(shape[0], dtype=dtype, device=device)}, f"functx.{_API}")
