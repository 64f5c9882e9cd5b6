"""Estimators of the curvature room: :func:`eigsh`, :func:`trace`, :func:`diagonal` and
:func:`spectral_density`.

Each works on any symmetric linear operator ``op`` with ``op.shape == (P, P)``, ``op.dtype``
(float32 or float64), ``op.device`` and ``op @ V`` for ``V`` of shape ``(P, K)`` (the operators
of :mod:`functx.curvature`), or on a square symmetric tensor. Products are always made in blocks
of columns, so an operator with a fast matrix product (one pass over the data for ``K`` vectors)
pays one pass per block.

The estimators are pure and reproducible: they run under :func:`torch.no_grad`, never modify the
operator, and draw their random vectors from a private :class:`torch.Generator` seeded with
``seed`` on the operator's device, so torch's global random state is untouched and every rank of
a ``torch.distributed`` run computes the same result.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal, NamedTuple, overload

import torch

from .._errors import report_nonconvergence
from .._validate import (
    check_bool,
    check_choice,
    check_chunk_size,
    check_int,
    check_optional_int,
    check_positive,
    check_seed,
    describe,
    fail,
)
from ._lanczos import batched_lanczos, preference, thick_restart_lanczos
from ._probes import Operator

_EIGSH = "curvature.eigsh"
_TRACE = "curvature.trace"
_DIAGONAL = "curvature.diagonal"
_DENSITY = "curvature.spectral_density"

_DEFAULT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}

Which = Literal["LA", "SA", "LM"]
_WHICH: tuple[Which, ...] = ("LA", "SA", "LM")


class EigshInfo(NamedTuple):
    """What :func:`eigsh` did, returned with ``return_info=True``.

    Attributes:
        converged: whether every returned pair met the tolerance.
        residual_norms: ``||op @ x - lambda x||`` of each returned pair (same order as the
            eigenvalues).
        threshold: the residual norm a pair had to reach: ``tol`` times the estimate of
            ``||op||_2`` (the largest Ritz value in magnitude).
        num_matvecs: the number of operator-vector products (a ``(P, K)`` product counts
            ``K``), what ``max_matvecs`` bounds.
        num_restarts: the number of thick restarts (0 for the dense path).
        method: ``"lanczos"`` or ``"dense"`` (small operators are materialised).
        num_steps: the number of block Lanczos steps, one ``(P, block_size)`` product each
            (for the dense path: the number of column blocks of the materialisation).

    ``matvecs`` and ``restarts`` are deprecated aliases of ``num_matvecs`` and
    ``num_restarts`` (removed in the next release).
    """

    converged: bool
    residual_norms: torch.Tensor
    threshold: float
    num_matvecs: int
    num_restarts: int
    method: str
    num_steps: int = 0

    @property
    def matvecs(self) -> int:
        """Deprecated alias of :attr:`num_matvecs`."""
        _renamed("EigshInfo.matvecs", "EigshInfo.num_matvecs")
        return self.num_matvecs

    @property
    def restarts(self) -> int:
        """Deprecated alias of :attr:`num_restarts`."""
        _renamed("EigshInfo.restarts", "EigshInfo.num_restarts")
        return self.num_restarts


def _renamed(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(
        f"`functx.curvature.{old}` is deprecated and will be removed in the next release; use "
        f"`functx.curvature.{new}` (the name every functx iterative routine uses).",
        FutureWarning,
        stacklevel=stacklevel,
    )


def _eigsh_sizes(k: int, ncv: Any, block_size: Any, max_matvecs: Any) -> tuple[int, int, int]:
    """Validated ``(ncv, block_size, max_matvecs)`` with their defaults."""
    b = check_optional_int(block_size, "block_size", _EIGSH, minimum=1) or k
    default_ncv = max(20, 2 * k + 1) if b == 1 else max(20, 10 * b, k + 3 * b)
    ncv = check_optional_int(ncv, "ncv", _EIGSH, minimum=k + 2 * b) or default_ncv
    max_matvecs = check_optional_int(max_matvecs, "max_matvecs", _EIGSH, minimum=k) or max(1000, 20 * ncv)
    return ncv, b, max_matvecs


def _dense_eigsh(A: Operator, k: int, which: str, tol: float) -> tuple[torch.Tensor, torch.Tensor, EigshInfo]:
    matrix = A.dense()
    values, vectors = torch.linalg.eigh(matrix)
    wanted = preference(values, which)[:k]
    values, vectors = values[wanted], vectors[:, wanted]
    residuals = torch.linalg.vector_norm(matrix @ vectors - vectors * values, dim=0)
    threshold = tol * float(values.abs().max()) if A.size else 0.0
    return values, vectors, EigshInfo(True, residuals, threshold, A.matvecs, 0, "dense", A.calls)


def _report(info: EigshInfo, max_matvecs: int, throw: bool, warn: bool) -> None:
    if info.converged:
        return
    message = (
        f"not converged after {info.num_matvecs} matvecs (max_matvecs={max_matvecs}): largest residual norm "
        f"{float(info.residual_norms.max()):.3e} > {info.threshold:.3e} (tol * ||op||); increase max_matvecs or "
        f"ncv, or loosen tol"
    )
    stats = {
        "converged": False,
        "num_matvecs": info.num_matvecs,
        "num_steps": info.num_steps,
        "num_restarts": info.num_restarts,
        "residual_norms": info.residual_norms,
        "threshold": info.threshold,
    }
    report_nonconvergence(_EIGSH, message, stats, throw, warn=warn, stacklevel=4)


@overload
def eigsh(
    op: Any,
    k: int = ...,
    which: Which = ...,
    *,
    tol: float | None = ...,
    max_matvecs: int | None = ...,
    seed: int = ...,
    ncv: int | None = ...,
    block_size: int | None = ...,
    throw: bool = ...,
    return_info: Literal[False] = ...,
    max_iter: int | None = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def eigsh(
    op: Any,
    k: int = ...,
    which: Which = ...,
    *,
    tol: float | None = ...,
    max_matvecs: int | None = ...,
    seed: int = ...,
    ncv: int | None = ...,
    block_size: int | None = ...,
    throw: bool = ...,
    return_info: Literal[True],
    max_iter: int | None = ...,
) -> tuple[torch.Tensor, torch.Tensor, EigshInfo]: ...


@torch.no_grad()
def eigsh(
    op: Any,
    k: int = 6,
    which: Which = "LA",
    *,
    tol: float | None = None,
    max_matvecs: int | None = None,
    seed: int = 0,
    ncv: int | None = None,
    block_size: int | None = None,
    throw: bool = False,
    return_info: bool = False,
    max_iter: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, EigshInfo]:
    """``k`` eigenvalues and eigenvectors of a symmetric operator, by block Lanczos with thick restarts.

    The Krylov basis (``P x ncv`` numbers) is fully reorthogonalised and, when full, restarted
    from its ``min(k + (n - k) // 2, ncv - 2 * block_size)`` best Ritz vectors (thick restart). A
    pair ``(lambda, x)`` has converged when ``||op @ x - lambda x|| <= tol * ||op||``, with
    ``||op||`` estimated by the largest Ritz value in magnitude (ARPACK's test is
    ``tol * |lambda|``: the same for the eigenvalue of largest magnitude); the residual norms come
    from the Lanczos relation, at no extra product.
    Convergence is checked after every block, so easy problems stop early. The block size
    defaults to ``k``: an eigenvalue of multiplicity up to ``block_size`` is found with all its
    copies (single-vector Lanczos, like ARPACK, can miss repeated copies); ``block_size=1`` needs
    fewer products when the wanted eigenvalues are known to be simple. When the operator is
    small (``P <= ncv + block_size``) it is materialised with ``P`` products and solved densely.

    Args:
        op: a symmetric linear operator (``shape``, ``dtype``, ``device``, ``op @ V``) or a
            square symmetric float32/float64 tensor.
        k: number of eigenpairs, ``1 <= k <= P`` (default: 6).
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic or ``"LM"`` largest in
            magnitude (default: ``"LA"``).
        tol: relative residual tolerance (default: ``None``, 1e-10 for float64 and 1e-5 for
            float32).
        max_matvecs: budget of operator-vector products, at least ``k`` (default: ``None``,
            ``max(1000, 20 * ncv)``).
        seed: seed of the random starting block (default: 0).
        ncv: largest basis size, at least ``k + 2 * block_size`` (default: ``None``,
            ``max(20, 2 * k + 1)`` for ``block_size=1``, else ``max(20, 10 * block_size,
            k + 3 * block_size)``).
        block_size: number of vectors multiplied together, ``>= 1`` (default: ``None``, ``k``).
        throw: when not converged within ``max_matvecs``, raise
            :class:`functx.NonConvergenceError` (with ``stats``: ``num_matvecs``,
            ``num_steps``, ``residual_norms``, ...) instead of returning the approximation
            (default: False).
        return_info: also return an :class:`EigshInfo` with ``converged``, the product count
            and the residual norms (default: False). Without it, a result that did not
            converge (``throw=False``) comes with a :class:`functx.NonConvergenceWarning`.
        max_iter: deprecated name of ``max_matvecs`` (it counts products, while ``max_iter``
            counts iterations everywhere else in functx); removed in the next release.

    Returns:
        ``(eigenvalues, eigenvectors)`` of shapes ``(k,)`` and ``(P, k)``, eigenvalues in
        ascending order (as :func:`scipy.sparse.linalg.eigsh` and :func:`torch.linalg.eigh`) with
        orthonormal eigenvectors as columns; ``(eigenvalues, eigenvectors, info)`` with
        ``return_info=True``.

    Raises:
        functx.NonConvergenceError: not converged within ``max_matvecs`` and ``throw=True``.

    Example:
        >>> import torch
        >>> import functx.curvature as fc
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> values, vectors, info = fc.eigsh(A, k=2, which="LA", return_info=True)
        >>> [round(float(x), 6) for x in values]
        [99.0, 100.0]
        >>> vectors.shape, info.converged
        (torch.Size([100, 2]), True)
    """
    A = Operator(op, _EIGSH)
    k = check_int(k, "k", _EIGSH, minimum=1, maximum=A.size)
    which = check_choice(which, "which", _WHICH, _EIGSH)
    tol = _DEFAULT_TOL[A.dtype] if tol is None else check_positive(tol, "tol", _EIGSH)
    seed = check_seed(seed, _EIGSH)
    if max_iter is not None:
        if max_matvecs is not None:
            raise fail(_EIGSH, "`max_iter` (deprecated) and `max_matvecs` must not both be given, got both.")
        _renamed("eigsh(max_iter=)", "eigsh(max_matvecs=)", stacklevel=4)
        max_matvecs = check_int(max_iter, "max_iter", _EIGSH, minimum=k)
    ncv, b, max_matvecs = _eigsh_sizes(k, ncv, block_size, max_matvecs)
    throw = check_bool(throw, "throw", _EIGSH)
    return_info = check_bool(return_info, "return_info", _EIGSH)
    if A.size <= ncv + b:
        values, vectors, info = _dense_eigsh(A, k, which, tol)
    else:
        result = thick_restart_lanczos(A, k, which, tol, max_matvecs, ncv, b, seed)
        values, vectors = result.values, result.vectors
        info = EigshInfo(
            result.converged,
            result.residual_norms,
            result.threshold,
            A.matvecs,
            result.restarts,
            "lanczos",
            result.steps,
        )
    order = torch.argsort(values, stable=True)
    info = info._replace(residual_norms=info.residual_norms[order])
    _report(info, max_matvecs, throw, warn=not return_info)
    if return_info:
        return values[order], vectors[:, order], info
    return values[order], vectors[:, order]


def _exact_diagonal(A: Operator) -> torch.Tensor:
    """The diagonal from ``P`` products with unit vectors, in column chunks."""
    step = A.chunk_size or A.size
    parts = []
    for start in range(0, A.size, step):
        stop = min(start + step, A.size)
        unit = torch.zeros(A.size, stop - start, dtype=A.dtype, device=A.device)
        rows = torch.arange(start, stop, device=A.device)
        unit[rows, rows - start] = 1
        parts.append(A.matmul(unit)[rows, rows - start])
    return torch.cat(parts)


def _hutch_plus_plus(A: Operator, num_matvecs: int, generator: torch.Generator) -> torch.Tensor:
    sketch_size = num_matvecs // 3
    sketch = A.rademacher(sketch_size, generator)
    probes = A.rademacher(num_matvecs - 2 * sketch_size, generator)
    Q = torch.linalg.qr(A.matmul(sketch)).Q
    exact_part = (Q * A.matmul(Q)).sum()
    probes = probes - Q @ (Q.mT @ probes)
    return exact_part + (probes * A.matmul(probes)).sum() / probes.shape[1]


class _Sketch(NamedTuple):
    """The shared first half of XTrace and XDiag (Epperly, Tropp & Webber 2024)."""

    probes: torch.Tensor  # Omega (P, s)
    Y: torch.Tensor  # A Omega
    Q: torch.Tensor  # orthonormal basis of range(Y) (P, s)
    Z: torch.Tensor  # A Q
    S: torch.Tensor | None  # columns of R^{-T}, normalised; None when Y is rank deficient


def _exchangeable_sketch(A: Operator, num_matvecs: int, generator: torch.Generator) -> _Sketch:
    """``s = num_matvecs // 2`` probes and the basis of their images.

    Leaving probe ``i`` out of the basis ``Q`` removes the direction ``Q s_i`` (``s_i`` the
    normalised ``i``-th column of ``R^{-T}``): ``Q_i Q_i^T = Q (I - s_i s_i^T) Q^T``. When ``Y``
    is numerically rank deficient, ``range(Y)`` is almost surely ``range(op)`` and the estimators
    are exact on it: ``Q`` is cut to that range and ``S`` is ``None``."""
    probes = A.rademacher(num_matvecs // 2, generator)
    Y = A.matmul(probes)
    Q, R = torch.linalg.qr(Y)
    U, sigma, _ = torch.linalg.svd(R)
    rank = int((sigma > 10 * max(A.size, R.shape[0]) * A.eps * sigma[0]).sum())
    if rank < R.shape[0]:
        Q = Q @ U[:, :rank]
        return _Sketch(probes, Y, Q, A.matmul(Q), None)
    inverse_t = torch.linalg.solve_triangular(R, torch.eye(R.shape[0], dtype=A.dtype, device=A.device), upper=True).mT
    S = inverse_t / torch.linalg.vector_norm(inverse_t, dim=0)
    return _Sketch(probes, Y, Q, A.matmul(Q), S)


def _deflate(M: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """Column ``i`` of the result is ``(I - s_i s_i^T) m_i``."""
    return M - S * (S * M).sum(0)


def _xtrace(A: Operator, num_matvecs: int, generator: torch.Generator) -> torch.Tensor:
    sk = _exchangeable_sketch(A, num_matvecs, generator)
    if sk.S is None:
        return (sk.Q * sk.Z).sum()
    H = sk.Q.mT @ sk.Z
    H = (H + H.mT) / 2
    C = _deflate(sk.Q.mT @ sk.probes, sk.S)  # (I - s_i s_i^T) Q^T omega_i
    T = sk.Z.mT @ sk.probes  # Q^T A omega_i
    basis_part = H.trace() - (sk.S * (H @ sk.S)).sum(0)
    rest = (sk.probes * sk.Y).sum(0) - 2 * (C * T).sum(0) + (C * (H @ C)).sum(0)
    return (basis_part + rest).mean()


def _xdiag(A: Operator, num_matvecs: int, generator: torch.Generator) -> torch.Tensor:
    sk = _exchangeable_sketch(A, num_matvecs, generator)
    basis_part = (sk.Q * sk.Z).sum(1)
    if sk.S is None:
        return basis_part
    count = sk.probes.shape[1]
    left_out = ((sk.Q @ sk.S) * (sk.Z @ sk.S)).sum(1) / count
    complement = sk.Y - sk.Q @ _deflate(sk.Z.mT @ sk.probes, sk.S)  # (I - Q_i Q_i^T) A omega_i
    return basis_part - left_out + (sk.probes * complement).sum(1) / count


def _hutchinson_probes(A: Operator, num_matvecs: int, generator: torch.Generator) -> torch.Tensor:
    """``probes * (op @ probes)`` for ``num_matvecs`` Rademacher probes: ``(P, num_matvecs)``."""
    probes = A.rademacher(num_matvecs, generator)
    return probes * A.matmul(probes)


_TRACE_MINIMUM = {"hutch++": 3, "hutchinson": 1, "xtrace": 2}


@torch.no_grad()
def trace(
    op: Any,
    num_matvecs: int = 100,
    method: str = "hutch++",
    *,
    seed: int = 0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """A randomized estimate of the trace of a symmetric operator from ``num_matvecs`` products.

    * ``"hutchinson"`` (Hutchinson 1989): the mean of ``z^T op z`` over ``num_matvecs``
      Rademacher probes; unbiased, error ``O(||op||_F / sqrt(num_matvecs))``.
    * ``"hutch++"`` (Meyer, Musco, Musco & Woodruff 2021): the exact trace on the range of
      ``op @ S`` (``num_matvecs // 3`` probes ``S``, and as many products for the basis) plus
      Hutchinson with the remaining probes on the complement; unbiased, error
      ``O(||op||_* / num_matvecs)`` for positive semi-definite ``op``.
    * ``"xtrace"`` (Epperly, Tropp & Webber 2024, the basic exchangeable estimator): Hutch++
      with ``num_matvecs // 2`` probes, each one left out of the basis in turn and used on its
      complement, averaged; unbiased and usually the most accurate for a given budget.

    ``"hutch++"`` and ``"xtrace"`` are exact when ``num_matvecs >= P`` (the trace is then read
    off ``P`` products with the unit vectors), and on an operator of rank ``r`` as soon as
    ``num_matvecs >= 3 r`` (``"hutch++"``) or ``num_matvecs >= 2 (r + 1)`` (``"xtrace"``).

    Args:
        op: a symmetric linear operator (``shape``, ``dtype``, ``device``, ``op @ V``) or a
            square symmetric float32/float64 tensor.
        num_matvecs: budget of operator-vector products, at least 3 for ``"hutch++"``, 2 for
            ``"xtrace"`` and 1 for ``"hutchinson"`` (default: 100).
        method: ``"hutch++"``, ``"hutchinson"`` or ``"xtrace"`` (default: ``"hutch++"``).
        seed: seed of the Rademacher probes (default: 0).
        chunk_size: the most vectors in one product with ``op`` (default: ``None``, all at once).

    Returns:
        A 0-dimensional tensor in ``op``'s dtype and device.

    Example:
        >>> import torch
        >>> import functx.curvature as fc
        >>> A = torch.diag(torch.arange(1.0, 51.0, dtype=torch.float64))
        >>> round(float(fc.trace(A, num_matvecs=10, method="hutchinson")), 6)  # exact for a diagonal matrix
        1275.0
        >>> B = torch.randn(50, 5, dtype=torch.float64)
        >>> torch.allclose(fc.trace(B @ B.T, num_matvecs=15), (B @ B.T).trace())  # rank 5: exact
        True
    """
    A = Operator(op, _TRACE, check_chunk_size(chunk_size, _TRACE))
    method = check_choice(method, "method", tuple(_TRACE_MINIMUM), _TRACE)
    num_matvecs = check_int(num_matvecs, "num_matvecs", _TRACE, minimum=_TRACE_MINIMUM[method])
    generator = A.generator(check_seed(seed, _TRACE))
    if method == "hutchinson":
        return _hutchinson_probes(A, num_matvecs, generator).sum() / num_matvecs
    if num_matvecs >= A.size:
        return _exact_diagonal(A).sum()
    if method == "hutch++":
        return _hutch_plus_plus(A, num_matvecs, generator)
    return _xtrace(A, num_matvecs, generator)


_DIAGONAL_MINIMUM = {"hutchinson": 1, "xdiag": 2}


@torch.no_grad()
def diagonal(
    op: Any,
    num_matvecs: int = 100,
    method: str = "hutchinson",
    *,
    seed: int = 0,
    as_tree: bool = False,
    chunk_size: int | None = None,
) -> Any:
    """A randomized estimate of the diagonal of a symmetric operator from ``num_matvecs`` products.

    * ``"hutchinson"`` (Bekas, Kokiopoulou & Saad 2007): the mean of ``z * (op @ z)`` over
      Rademacher probes; unbiased, exact for a diagonal operator.
    * ``"xdiag"`` (Epperly, Tropp & Webber 2024): the diagonal of ``op`` on the range of
      ``op @ Omega`` (``num_matvecs // 2`` probes), with each probe left out in turn and used by
      Hutchinson on the complement, averaged; far more accurate for operators with a decaying
      spectrum, and exact when ``num_matvecs >= P`` (the diagonal is then read off ``P``
      products with the unit vectors) or, on an operator of rank ``r``, once
      ``num_matvecs >= 2 (r + 1)``.

    Args:
        op: a symmetric linear operator (``shape``, ``dtype``, ``device``, ``op @ V``) or a
            square symmetric float32/float64 tensor.
        num_matvecs: budget of operator-vector products, at least 1 for ``"hutchinson"`` and 2
            for ``"xdiag"`` (default: 100).
        method: ``"hutchinson"`` or ``"xdiag"`` (default: ``"hutchinson"``).
        seed: seed of the Rademacher probes (default: 0).
        as_tree: return a pytree shaped like the operator's parameters, through
            ``op.unflatten`` (default: False).
        chunk_size: the most vectors in one product with ``op`` (default: ``None``, all at once).

    Returns:
        A ``(P,)`` tensor, or ``op.unflatten`` of it with ``as_tree=True``.

    Example:
        >>> import torch
        >>> import functx.curvature as fc
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> [round(float(x), 6) for x in fc.diagonal(A, num_matvecs=4)]  # exact for a diagonal matrix
        [1.0, 2.0, 3.0]
        >>> B = torch.randn(40, 3, dtype=torch.float64)
        >>> torch.allclose(fc.diagonal(B @ B.T, num_matvecs=8, method="xdiag"), (B @ B.T).diagonal())
        True
    """
    A = Operator(op, _DIAGONAL, check_chunk_size(chunk_size, _DIAGONAL))
    method = check_choice(method, "method", tuple(_DIAGONAL_MINIMUM), _DIAGONAL)
    num_matvecs = check_int(num_matvecs, "num_matvecs", _DIAGONAL, minimum=_DIAGONAL_MINIMUM[method])
    generator = A.generator(check_seed(seed, _DIAGONAL))
    if check_bool(as_tree, "as_tree", _DIAGONAL):
        A.require_unflatten()  # before any product
    if method == "hutchinson":
        estimate = _hutchinson_probes(A, num_matvecs, generator).sum(1) / num_matvecs
    elif num_matvecs >= A.size:
        estimate = _exact_diagonal(A)
    else:
        estimate = _xdiag(A, num_matvecs, generator)
    return A.unflatten(estimate) if as_tree else estimate


def _default_sigma(nodes: torch.Tensor) -> float:
    """1/100 of the spread of the Ritz values (of their magnitude when they coincide, else 1e-2)."""
    low, high = float(nodes.min()), float(nodes.max())
    width = high - low
    if width <= 1e3 * torch.finfo(nodes.dtype).eps * max(abs(low), abs(high)):
        width = max(abs(low), abs(high)) or 1.0
    return width / 100


def _density_grid(nodes: torch.Tensor, sigma: float, num_points: int) -> torch.Tensor:
    """``num_points`` points from ``8 sigma`` below the smallest Ritz value to ``8 sigma`` above the
    largest (the Gaussian tails left out weigh below 1e-15)."""
    low, high = float(nodes.min()) - 8 * sigma, float(nodes.max()) + 8 * sigma
    return torch.linspace(low, high, num_points, dtype=nodes.dtype, device=nodes.device)


def _check_grid(grid: Any, A: Operator) -> torch.Tensor:
    if not isinstance(grid, torch.Tensor):
        raise fail(_DENSITY, f"`grid` must be None or a 1-D tensor, got {describe(grid)}.", TypeError)
    if grid.ndim != 1 or grid.numel() < 2:
        raise fail(_DENSITY, f"`grid` must be a 1-D tensor of at least 2 points, got shape {tuple(grid.shape)}.")
    return grid.to(dtype=A.dtype, device=A.device)


@torch.no_grad()
def spectral_density(
    op: Any,
    num_probes: int = 10,
    num_steps: int = 50,
    *,
    seed: int = 0,
    grid: torch.Tensor | None = None,
    num_points: int = 1000,
    sigma: float | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The spectral density of a symmetric operator by stochastic Lanczos quadrature (SLQ).

    For each of ``num_probes`` Rademacher probes ``z`` (scaled to unit norm), ``num_steps``
    Lanczos steps (fully reorthogonalised) give a tridiagonal ``T = U diag(theta) U^T``; the
    Gauss quadrature nodes ``theta_j`` with weights ``tau_j = U[0, j]^2`` (summing to 1) satisfy
    ``sum_j tau_j f(theta_j) ~= z^T f(op) z / ||z||^2``, exactly for polynomials of degree
    ``< 2 num_steps``. The density is the average over probes of ``sum_j tau_j g(t - theta_j)``
    with ``g`` the Gaussian of standard deviation ``sigma`` (Lin, Saad & Yang 2016; Ghorbani,
    Krishnan & Xiao 2019). Hence it integrates to 1, and its mean ``∫ t rho(t) dt`` is
    ``trace(op, num_probes, "hutchinson", seed=seed) / P`` exactly: the same probes. All probes
    run together: each step is one ``(P, num_probes)`` product (``num_probes * num_steps``
    matvecs in all, ``P * num_probes * num_steps`` numbers of memory).

    Args:
        op: a symmetric linear operator (``shape``, ``dtype``, ``device``, ``op @ V``) or a
            square symmetric float32/float64 tensor.
        num_probes: number of random probes, ``>= 1`` (default: 10).
        num_steps: Lanczos steps per probe, ``>= 1`` (default: 50); more than ``P`` gains nothing.
        seed: seed of the Rademacher probes (default: 0).
        grid: 1-D tensor of points where the density is evaluated (default: ``None``,
            ``num_points`` evenly spaced points from ``8 sigma`` below the smallest node to
            ``8 sigma`` above the largest).
        num_points: number of points of the default grid, ``>= 2`` (default: 1000).
        sigma: standard deviation of the Gaussian broadening (default: ``None``, 1/100 of the
            spread of the nodes). A warning is issued when the grid is coarser than ``sigma``,
            as the density would be undersampled.
        chunk_size: the most probes run together (default: ``None``, all).

    Returns:
        ``(grid, density)``, two 1-D tensors of the same length.

    Example:
        >>> import torch
        >>> import functx.curvature as fc
        >>> A = torch.diag(torch.linspace(0.0, 1.0, 200, dtype=torch.float64))
        >>> grid, density = fc.spectral_density(A, num_probes=4, num_steps=30)
        >>> round(float(torch.trapezoid(density, grid)), 4)
        1.0
        >>> mean = torch.trapezoid(grid * density, grid)
        >>> torch.allclose(mean, fc.trace(A, 4, "hutchinson") / 200)
        True
    """
    A = Operator(op, _DENSITY)
    num_probes = check_int(num_probes, "num_probes", _DENSITY, minimum=1)
    num_steps = check_int(num_steps, "num_steps", _DENSITY, minimum=1)
    num_points = check_int(num_points, "num_points", _DENSITY, minimum=2)
    sigma = None if sigma is None else check_positive(sigma, "sigma", _DENSITY)
    chunk = check_chunk_size(chunk_size, _DENSITY) or num_probes
    grid = None if grid is None else _check_grid(grid, A)
    probes = A.rademacher(num_probes, A.generator(check_seed(seed, _DENSITY))) / math.sqrt(A.size)
    nodes, weights = [], []
    for start in range(0, num_probes, chunk):
        alpha, beta = batched_lanczos(A, probes[:, start : start + chunk], num_steps)
        T = torch.diag_embed(alpha) + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
        theta, U = torch.linalg.eigh(T)
        nodes.append(theta.reshape(-1))
        weights.append(U[:, 0, :].square().reshape(-1))
    node, weight = torch.cat(nodes), torch.cat(weights) / num_probes
    sigma = _default_sigma(node) if sigma is None else sigma
    grid = _density_grid(node, sigma, num_points) if grid is None else grid
    if float(grid.diff().abs().max()) > sigma:
        warnings.warn(
            f"`functx.{_DENSITY}`: the grid spacing exceeds sigma={sigma:.3g}: the density is undersampled and its "
            f"integral over the grid may differ from 1; use more points or a larger sigma",
            RuntimeWarning,
            stacklevel=3,  # the caller, above torch.no_grad's wrapper
        )
    gauss = torch.exp(-0.5 * ((grid[:, None] - node) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    return grid, gauss @ weight
