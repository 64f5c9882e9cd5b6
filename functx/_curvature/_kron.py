"""Kronecker-factored curvature: the blocks, their algebra and their damped functions.

A :class:`KroneckerOperatorBase` is block diagonal over contiguous slices of the flattening;
each block is a :class:`KronBlock`:

* a Kronecker block ``G ⊗ A``: the block acts as ``V -> G V A`` on a matrix ``V`` of shape
  ``(m, n)`` whose columns are the block's parameters side by side, each reshaped to
  ``(m, n_i)`` (``[W | b]``: a Linear weight ``(out, in)``, then its bias as a last column;
  a Conv2d weight as ``(out, in/groups kh kw)``); the slice is those parameters' row-major
  entries concatenated, so the weight's ``m n_1`` entries come first, then the bias's ``m``.
  ``A`` may be a diagonal ``(n,)``; ``transposed=True``: the slice is the row-major vec of
  ``V^T``, an Embedding weight ``(num_embeddings, dim)`` with ``G`` over ``dim``;
* a G-only block (a separate bias): the slice is a vector of length ``m``, acted on by ``G``;
* a diagonal block: ``G`` is a ``(p,)`` vector multiplying the slice elementwise;
* EKFAC: ``eigenvalues`` (``(m, n)``, ``(m,)`` for a G-only block) replace ``λ_G λ_A^T`` in the
  eigenbasis ``Q_G ⊗ Q_A`` of the factors.

Products need no data pass and no collective. Inverses, powers and log-determinants go through
the eigendecompositions of the (detached) factors, computed once per block, lazily, in float64
when the factors are float32, and cached on the operator (thread-safe); a damping ``δ`` (a float,
a 0-d tensor or a dict block name -> value) only changes the eigenvalues ``Λ + δ``, so a new
damping costs no decomposition and a tensor damping stays differentiable.

A subclass (``_kfac``) computes the factors, then calls ``self._set_blocks(blocks, eigen=...)``;
``eigen`` optionally hands over the decompositions it already made (EKFAC: the basis its
eigenvalues were measured in), ``name -> (g_vals, g_vecs, a_vals, a_vecs)`` as returned by
:func:`factor_eigh`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import torch

from .._torch_internals import transforms_active
from .._validate import api_name, check_choice, check_float, check_scalar_tensor_or_float, describe, is_number
from ._base import CurvatureOperatorBase

Damping = float | torch.Tensor
_MODES = ("exact", "factors", "heuristic")


class KronBlock(NamedTuple):
    """One block of a Kronecker-factored operator (``K.blocks[name]``).

    The block acts as ``V -> G V A`` on the matrix ``V = [P_1 | P_2 | ...]`` of its
    parameters, each reshaped to ``(m, n_i)`` (a Linear's ``[W | b]``), i.e. as
    ``G ⊗ A`` on the row-major vec of ``V``.

    Attributes:
        params: the names of the block's parameters, in the operator's flattening order.
        G: the ``(m, m)`` gradient-side factor; for a diagonal block, the ``(p,)`` diagonal.
        A: the ``(n, n)`` input-side factor, a ``(n,)`` diagonal (Embedding), or ``None``
            (a G-only block, e.g. a separate bias, or a diagonal block).
        eigenvalues: EKFAC's ``(m, n)`` (``(m,)`` for a G-only block) second moments in the
            eigenbasis ``Q_G ⊗ Q_A``, replacing ``λ_G λ_A^T``; ``None`` for KFAC.
        transposed: the block's slice is the row-major vec of ``V^T`` (``(n, m)``) instead of
            ``V`` (``(m, n)``): an Embedding weight, ``G`` over its columns.

    Example:
        >>> import torch
        >>> from functx.curvature import KronBlock
        >>> block = KronBlock(("fc.weight",), G=torch.eye(2), A=torch.eye(3))
        >>> block.params, block.eigenvalues is None, block.transposed
        (('fc.weight',), True, False)
    """

    params: tuple[str, ...]
    G: torch.Tensor
    A: torch.Tensor | None
    eigenvalues: torch.Tensor | None = None
    transposed: bool = False


def factor_eigh(
    M: torch.Tensor, dtype: torch.dtype | None = None, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(eigenvalues ascending, eigenvectors)`` of a symmetric factor (symmetrised first unless
    ``symmetric`` says it is exactly).

    Computed in ``dtype`` (default: float64 when ``M`` is float32 or narrower, else ``M``'s
    dtype) and returned in it; a 1-D (diagonal) ``M`` gives ``(M, None)``, the identity basis.
    """
    dtype = dtype or spectral_dtype(M.dtype)
    M = M.detach().to(dtype)
    if M.ndim == 1:
        return M, None
    values, vectors = torch.linalg.eigh(M if symmetric else (M + M.mT) / 2)
    return values, vectors


def spectral_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the factors' eigendecompositions: float64 for float32 or narrower, else ``dtype``."""
    return torch.float64 if torch.finfo(dtype).bits <= 32 else dtype


class _Eigen(NamedTuple):
    g_vals: torch.Tensor
    g_vecs: torch.Tensor | None
    a_vals: torch.Tensor | None
    a_vecs: torch.Tensor | None


class _Slot(NamedTuple):
    """Where a block lives in the flattening and how its slice is shaped."""

    name: str
    start: int
    stop: int
    kind: str  # "kron" | "g_only" | "diagonal"
    m: int
    n: int
    transposed: bool
    widths: tuple[int, ...]  # columns of V from each parameter (a joint bias: (n - 1, 1))


# -- block shapes ------------------------------------------------------------------------------


def _to_matrix(X: torch.Tensor, slot: _Slot) -> torch.Tensor:
    """``(K, size) -> (K, m, n)`` for a Kronecker block: each parameter's entries are the
    row-major vec of its ``(m, n_i)`` columns of ``V`` (``[W | b]``: the weight, then the bias)."""
    K = X.shape[0]
    if slot.transposed:
        return X.reshape(K, slot.n, slot.m).transpose(1, 2)
    if len(slot.widths) == 1:
        return X.reshape(K, slot.m, slot.n)
    pieces = X.split([slot.m * w for w in slot.widths], dim=1)
    return torch.cat([p.reshape(K, slot.m, w) for p, w in zip(pieces, slot.widths)], dim=2)


def _from_matrix(Y: torch.Tensor, slot: _Slot) -> torch.Tensor:
    K = Y.shape[0]
    if slot.transposed:
        return Y.transpose(1, 2).reshape(K, -1)
    if len(slot.widths) == 1:
        return Y.reshape(K, -1)
    return torch.cat([p.reshape(K, -1) for p in Y.split(list(slot.widths), dim=2)], dim=1)


def _right(Y: torch.Tensor, M: torch.Tensor | None, transpose: bool = False) -> torch.Tensor:
    """``Y M`` (``M`` a matrix), ``Y diag(M)`` (``M`` 1-D) or ``Y`` (``None``)."""
    if M is None:
        return Y
    if M.ndim == 1:
        return Y * M
    return Y @ (M.mT if transpose else M)


def _kron_product(X: torch.Tensor, slot: _Slot, G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``G V A`` on the rows of ``X``. A vector (one row) takes 2-D products only; one on a large
    ``V = [W | b]`` (a joint bias) is not copied into ``V`` and the result out of it:
    ``[G W A_ww + G b a_bw | G W a_wb + G b a_bb]``."""
    if X.shape[0] > 1 or A.ndim != 2:
        return _from_matrix(_right(G @ _to_matrix(X, slot), A), slot)
    m, n = slot.m, slot.n
    if slot.transposed or slot.widths[1:] != (1,) or m * n < 2**16:
        return _from_matrix((G @ _to_matrix(X, slot)[0] @ A)[None], slot)
    W, b = X[0].split([m * (n - 1), m])
    GW, Gb = G @ W.view(m, n - 1), G @ b.view(m, 1)
    out_w = (GW @ A[:-1, :-1]).addmm_(Gb, A[-1:, :-1])
    out_b = (GW @ A[:-1, -1:]).addmm_(Gb, A[-1:, -1:])
    return torch.cat([out_w.reshape(-1), out_b.reshape(-1)])[None]


def _spectral_block(X: torch.Tensor, slot: _Slot, Qg: torch.Tensor | None, Qa: torch.Tensor | None, D: torch.Tensor):
    """``Q diag(D) Q^T`` applied to the rows of ``X`` (``Q = Q_G ⊗ Q_A``, identity where None)."""
    if slot.kind == "diagonal":
        return X * D
    if slot.kind == "g_only":
        return _right(_right(X, Qg) * D, Qg, transpose=True)
    Y = _to_matrix(X, slot)
    Y = Y if Qg is None else Qg.mT @ Y
    Y = _right(Y, Qa) * D
    Y = Y if Qg is None else Qg @ Y
    return _from_matrix(_right(Y, Qa, transpose=True), slot)


def _spectral_diagonal(slot: _Slot, Qg: torch.Tensor | None, Qa: torch.Tensor | None, D: torch.Tensor):
    """The diagonal of ``Q diag(D) Q^T`` on the block's slice."""
    if slot.kind == "diagonal":
        return D
    assert Qg is not None
    if slot.kind == "g_only":
        return Qg.square() @ D
    right = D if Qa is None else D @ Qa.square().mT
    return _from_matrix((Qg.square() @ right)[None], slot)[0]


# -- the block-diagonal operator layer ---------------------------------------------------------


class _BlockDiagonal(CurvatureOperatorBase):
    """A block-diagonal operator over contiguous slices (``self._slots``, in flattening order)."""

    _slots: list[_Slot]

    def _apply_block(self, slot: _Slot, X: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _apply(self, V: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._apply_block(s, V[:, s.start : s.stop]) for s in self._slots], dim=1)

    def to_dense(self) -> torch.Tensor:
        """The ``(P, P)`` matrix, assembled block by block (small ``P`` only)."""
        blocks = []
        for s in self._slots:
            eye = torch.eye(s.stop - s.start, dtype=self.dtype, device=self.device)
            blocks.append(self._apply_block(s, eye).mT)
        return torch.block_diag(*blocks)


class KroneckerOperatorBase(_BlockDiagonal):
    """A block-diagonal Kronecker-factored curvature operator (the base of
    :class:`~functx.curvature.KFACOperator` and :class:`~functx.curvature.EKFACOperator`).

    Beyond the operator protocol (``@``, ``shape``, ``to_dense``, ...) it gives the closed
    forms ``trace``, ``diagonal``, ``frobenius_norm``, ``logdet`` and the damped functions
    ``inverse`` and ``power``, which return operators. The factors' eigendecompositions run in
    the class attribute ``_eigh_dtype`` (``None``: float64 for float32 factors, else theirs).
    """

    _eigh_dtype: torch.dtype | None = None  # None: float64 for float32 factors, else their dtype

    # -- construction (by the subclass) ----------------------------------------------------

    def _set_blocks(self, blocks: Mapping[str, KronBlock], eigen: Mapping[str, tuple[Any, ...]] | None = None) -> None:
        """Validate and store the blocks (every parameter in exactly one block, contiguous,
        sizes consistent with the layout); ``eigen`` seeds the eigendecomposition cache."""
        keys = self._layout.keys
        if keys is None:
            raise self._error("Kronecker blocks need `params` as a dict name -> tensor", TypeError)
        index = {k: i for i, k in enumerate(keys)}
        offsets = [0]
        for size in self._layout.sizes:
            offsets.append(offsets[-1] + size)
        owner: dict[str, str] = {}
        slots = []
        for name, block in blocks.items():
            slots.append(self._check_block(name, block, index, offsets, owner))
        missing = [k for k in keys if k not in owner]
        if missing:
            raise self._error(f"the blocks must cover every parameter; {missing} are in no block")
        self._blocks = dict(blocks)
        self._slots = sorted(slots, key=lambda s: s.start)
        self._slot_of = {s.name: s for s in self._slots}
        self._eigen_cache: dict[str, _Eigen] = {}
        self._cast_cache: dict[tuple[str, torch.dtype], tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self._spectra: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        for name, value in (eigen or {}).items():
            if name not in self._blocks:
                raise self._error(f"`eigen` names {name!r}, which is not a block")
            self._eigen_cache[name] = _Eigen(*value)

    def _check_block(
        self, name: str, block: Any, index: dict[str, int], offsets: list[int], owner: dict[str, str]
    ) -> _Slot:
        if not isinstance(block, KronBlock):
            raise self._error(f"block {name!r} must be a KronBlock, got {describe(block)}", TypeError)
        params = tuple(block.params)
        if not params or params[0] != name:
            raise self._error(f"block {name!r} must be named after its first parameter, got params {params}")
        for p in params:
            if p not in index:
                raise self._error(f"block {name!r} names {p!r}, which is not in params")
            if p in owner:
                raise self._error(f"{p!r} is in two blocks, {owner[p]!r} and {name!r}")
            owner[p] = name
        first = index[params[0]]
        if [index[p] for p in params] != list(range(first, first + len(params))):
            raise self._error(f"block {name!r}: its params {params} must be contiguous, in flattening order")
        start, stop = offsets[first], offsets[first + len(params)]
        G, A, lam = block.G, block.A, block.eigenvalues
        for what, t in (("G", G), ("A", A), ("eigenvalues", lam)):
            if t is not None and (not isinstance(t, torch.Tensor) or t.dtype != self.dtype or t.device != self.device):
                raise self._error(
                    f"block {name!r}: `{what}` must be a {self.dtype} tensor on {self.device}, got {describe(t)}",
                    TypeError,
                )
        if not isinstance(G, torch.Tensor) or G.ndim not in (1, 2) or (G.ndim == 2 and G.shape[0] != G.shape[1]):
            raise self._error(f"block {name!r}: `G` must be a square matrix or a vector, got {describe(G)}")
        if A is not None and (A.ndim not in (1, 2) or (A.ndim == 2 and A.shape[0] != A.shape[1])):
            raise self._error(f"block {name!r}: `A` must be None, a square matrix or a vector, got {describe(A)}")
        m = G.shape[0]
        n = 1 if A is None else A.shape[0]
        kind = "diagonal" if G.ndim == 1 else ("g_only" if A is None else "kron")
        if kind == "diagonal" and A is not None:
            raise self._error(f"block {name!r}: a diagonal block (1-D `G`) takes `A=None`")
        if m * n != stop - start:
            raise self._error(f"block {name!r}: factors of sizes ({m}, {n}) cannot act on its {stop - start} entries")
        expected = {"kron": (m, n), "g_only": (m,), "diagonal": None}[kind]
        if lam is not None and (expected is None or tuple(lam.shape) != expected):
            raise self._error(f"block {name!r}: `eigenvalues` must have shape {expected}, got {describe(lam)}")
        if block.transposed and (kind != "kron" or len(params) != 1):
            raise self._error(f"block {name!r}: only a Kronecker block of one parameter can be transposed")
        sizes = [offsets[index[p] + 1] - offsets[index[p]] for p in params]
        if kind != "kron":
            return _Slot(name, start, stop, kind, m, n, False, (n,))
        if any(size % m for size in sizes):
            raise self._error(f"block {name!r}: every parameter's size, {sizes}, must be a multiple of m = {m}")
        widths = tuple(size // m for size in sizes)
        return _Slot(name, start, stop, kind, m, n, bool(block.transposed), widths)

    def _error(self, message: str, kind: type[Exception] = ValueError) -> Exception:
        return kind(f"{api_name(self._api)}: {message}.")

    # -- the blocks ----------------------------------------------------------------------------

    @property
    def blocks(self) -> MappingProxyType[str, KronBlock]:
        """A read-only mapping: block name (its first parameter's) -> :class:`KronBlock`."""
        return MappingProxyType(self._blocks)

    def _apply_block(self, slot: _Slot, X: torch.Tensor) -> torch.Tensor:
        block = self._blocks[slot.name]
        if block.eigenvalues is not None:
            Qg, Qa = self._bases(slot.name, X.dtype)
            return _spectral_block(X, slot, Qg, Qa, block.eigenvalues.to(X.dtype))
        if slot.kind == "diagonal":
            return X * block.G
        if slot.kind == "g_only":
            return X @ block.G
        assert block.A is not None
        return _kron_product(X, slot, block.G, block.A)

    # -- eigendecompositions (lazy, once, thread-safe) -----------------------------------------

    def _eigen(self, name: str) -> _Eigen:
        """The cached eigendecomposition of block ``name``'s factors (computed at first use)."""
        cached = self._eigen_cache.get(name)
        if cached is not None:
            return cached
        with self._lock:
            cached = self._eigen_cache.get(name)
            if cached is None:
                block = self._blocks[name]
                dtype = self._eigh_dtype or spectral_dtype(self.dtype)
                g_vals, g_vecs = factor_eigh(block.G, dtype)
                a_vals, a_vecs = (None, None) if block.A is None else factor_eigh(block.A, dtype)
                cached = self._eigen_cache[name] = _Eigen(g_vals, g_vecs, a_vals, a_vecs)
        return cached

    def _bases(self, name: str, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(Q_G, Q_A)`` of block ``name`` cast to ``dtype`` (cached)."""
        cached = self._cast_cache.get((name, dtype))
        if cached is None:
            e = self._eigen(name)
            cast = (None if e.g_vecs is None else e.g_vecs.to(dtype), None if e.a_vecs is None else e.a_vecs.to(dtype))
            cached = self._cast_cache[(name, dtype)] = cast
        return cached

    def _spectrum(self, slot: _Slot) -> torch.Tensor:
        """The block's eigenvalues ``Λ`` (``(m, n)``, ``(m,)`` or ``(p,)``), in the eigh dtype;
        the factors' eigenvalues are clipped at 0 (the factors are PSD by construction)."""
        cached = self._spectra.get(slot.name)
        if cached is not None:
            return cached
        block, e = self._blocks[slot.name], self._eigen(slot.name)
        if block.eigenvalues is not None:
            lam = block.eigenvalues.detach().to(e.g_vals.dtype).clamp(min=0)
        elif slot.kind != "kron":
            lam = e.g_vals.clamp(min=0)
        else:
            assert e.a_vals is not None
            lam = e.g_vals.clamp(min=0)[:, None] * e.a_vals.clamp(min=0)[None, :]
        self._spectra[slot.name] = lam
        return lam

    # -- closed forms ----------------------------------------------------------------------

    def trace(self) -> torch.Tensor:
        """``tr(K)``, exactly, from the factors (a 0-d tensor in the operator's dtype).

        Example:
            >>> import torch
            >>> from functx._curvature._kron import toy_kron_operator
            >>> K = toy_kron_operator()
            >>> bool(torch.isclose(K.trace(), K.to_dense().trace()))
            True
        """
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for slot in self._slots:
            block = self._blocks[slot.name]
            if block.eigenvalues is not None:
                total = total + block.eigenvalues.sum()
            elif slot.kind == "kron":
                assert block.A is not None
                total = total + block.G.diagonal().sum() * _diag(block.A).sum()
            else:
                total = total + _diag(block.G).sum()
        return total

    def diagonal(self, as_tree: bool = False) -> Any:
        """``diag(K)``, exactly: a ``(P,)`` tensor, or a pytree like ``params`` (``as_tree``).

        Example:
            >>> import torch
            >>> from functx._curvature._kron import toy_kron_operator
            >>> K = toy_kron_operator()
            >>> torch.allclose(K.diagonal(), K.to_dense().diagonal())
            True
        """
        if not isinstance(as_tree, bool):
            raise self._error(f"`as_tree` must be a bool, got {as_tree!r}", TypeError)
        pieces = []
        for slot in self._slots:
            block = self._blocks[slot.name]
            if block.eigenvalues is not None:
                Qg, Qa = self._bases(slot.name, self.dtype)
                piece = _spectral_diagonal(slot, Qg, Qa, block.eigenvalues)
            elif slot.kind == "kron":
                assert block.A is not None
                outer = block.G.diagonal()[:, None] * _diag(block.A)[None, :]
                piece = _from_matrix(outer[None], slot)[0]
            else:
                piece = _diag(block.G)
            pieces.append(piece)
        flat = torch.cat(pieces)
        return self.unflatten(flat) if as_tree else flat

    def frobenius_norm(self) -> torch.Tensor:
        """``||K||_F``, exactly, from the factors (a 0-d tensor).

        Example:
            >>> import torch
            >>> from functx._curvature._kron import toy_kron_operator
            >>> K = toy_kron_operator()
            >>> bool(torch.isclose(K.frobenius_norm(), torch.linalg.matrix_norm(K.to_dense())))
            True
        """
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for slot in self._slots:
            block = self._blocks[slot.name]
            if block.eigenvalues is not None:
                total = total + block.eigenvalues.square().sum()
            elif slot.kind == "kron":
                assert block.A is not None
                total = total + block.G.square().sum() * _frob2(block.A)
            else:
                total = total + _frob2(block.G)
        return total.sqrt()

    def logdet(self, damping: Any = 0.0) -> torch.Tensor:
        """``log det(K + δI)`` from the cached eigendecompositions (``-inf`` when singular).

        Args:
            damping: ``δ >= 0``: a float, a 0-d tensor (the result is differentiable in it), or a
                dict block name -> value with every block's name. (default: 0.0)

        Returns:
            A 0-d tensor in the operator's dtype.

        Example:
            >>> import torch
            >>> from functx._curvature._kron import toy_kron_operator
            >>> K = toy_kron_operator()
            >>> eye = torch.eye(K.shape[0], dtype=K.dtype)
            >>> bool(torch.isclose(K.logdet(0.1), torch.logdet(K.to_dense() + 0.1 * eye)))
            True
        """
        deltas = self._damping(damping, "logdet")
        total: Any = 0.0
        for slot in self._slots:
            total = total + (self._spectrum(slot) + deltas[slot.name]).log().sum()
        return torch.as_tensor(total).to(self.dtype)

    def inverse(self, damping: Any = 1e-3, mode: str = "exact") -> CurvatureOperatorBase:
        """The damped inverse, as an operator (products cost four small matmuls per block).

        * ``"exact"``: ``(K + δI)^{-1}``, from the cached eigendecompositions (any ``δ``
          without a new decomposition).
        * ``"factors"``: ``(G + √δ I)^{-1} ⊗ (A + √δ I)^{-1}`` per Kronecker block.
        * ``"heuristic"``: ``(G + (√δ/π) I)^{-1} ⊗ (A + π√δ I)^{-1}`` with
          ``π = sqrt((tr A / n) / (tr G / m))`` (Martens & Grosse 2015, §6.3; ``√δ`` on both
          where a trace is 0).

        G-only and diagonal blocks are ``(G + δ)^{-1}`` in every mode; EKFAC blocks support
        ``"exact"`` only.

        Args:
            damping: ``δ >= 0``: a float, a 0-d tensor (products are differentiable in it),
                or a dict block name -> value with every block's name. (default: 1e-3)
            mode: ``"exact"``, ``"factors"`` or ``"heuristic"``. (default: ``"exact"``)

        Returns:
            A symmetric operator (``@``, ``shape``, ``to_dense``, ...), usable as a
            preconditioner and by the estimators.

        Example:
            >>> import torch
            >>> from functx._curvature._kron import toy_kron_operator
            >>> K = toy_kron_operator()
            >>> v = torch.randn(K.shape[0], dtype=K.dtype)
            >>> Ki = K.inverse(damping=0.1)
            >>> torch.allclose(Ki @ (K @ v + 0.1 * v), v)
            True
        """
        mode = check_choice(mode, "mode", _MODES, self._api + ".inverse")
        return self._function(-1.0, damping, mode, "inverse")

    def power(self, p: float, damping: Any = 1e-3) -> CurvatureOperatorBase:
        """``(K + δI)^p`` for any real ``p``, exactly, from the cached eigendecompositions.

        ``p = -1`` is ``inverse(damping)``; ``p = -1/2`` maps standard normal draws to draws
        of ``N(0, (K + δI)^{-1})`` (a Laplace posterior's samples).

        Args:
            p: a real number.
            damping: ``δ >= 0``: a float, a 0-d tensor (differentiable) or a dict block name ->
                value with every block's name. (default: 1e-3, as :meth:`inverse`)

        Returns:
            A symmetric operator, as :meth:`inverse`.

        Example:
            >>> import torch
            >>> from functx._curvature._kron import toy_kron_operator
            >>> K = toy_kron_operator()
            >>> S = K.power(-0.5, damping=0.1)
            >>> torch.allclose((S @ S).to_dense(), K.inverse(0.1).to_dense())
            True
        """
        p = check_float(p, "p", self._api + ".power")
        return self._function(p, damping, "exact", "power")

    # -- damping and damped functions ----------------------------------------------------------

    def _damping(self, damping: Any, method: str) -> dict[str, Damping]:
        api = f"{self._api}.{method}"
        if isinstance(damping, Mapping):
            names = list(self._blocks)
            unknown = [k for k in damping if k not in self._blocks]
            missing = [k for k in names if k not in damping]
            if unknown or missing:
                raise ValueError(
                    f"{api_name(api)}: a `damping` dict must map every block name {names} to a value, "
                    f"got unknown {unknown} and missing {missing}."
                )
            return {k: check_scalar_tensor_or_float(damping[k], f"damping[{k!r}]", api) for k in names}
        if not (is_number(damping) or isinstance(damping, torch.Tensor)):
            raise TypeError(
                f"{api_name(api)}: `damping` must be a float, a 0-d tensor or a dict block name -> value, "
                f"got {describe(damping)}."
            )
        value = check_scalar_tensor_or_float(damping, "damping", api)
        return dict.fromkeys(self._blocks, value)

    def _function(self, p: float, damping: Any, mode: str, method: str) -> _KronFunctionOperator:
        deltas = self._damping(damping, method)
        values: dict[str, torch.Tensor] = {}
        for slot in self._slots:
            block, delta = self._blocks[slot.name], deltas[slot.name]
            if mode != "exact" and block.eigenvalues is not None:
                raise ValueError(
                    f"{api_name(self._api + '.' + method)}: `mode` {mode!r} needs KFAC factors; block "
                    f"{slot.name!r} has EKFAC eigenvalues, which support mode='exact' only."
                )
            if mode == "exact" or slot.kind != "kron":
                lam = self._spectrum(slot) + delta
            else:
                e = self._eigen(slot.name)
                assert e.a_vals is not None
                g, a = e.g_vals.clamp(min=0), e.a_vals.clamp(min=0)
                root = _sqrt(delta)
                if mode == "heuristic":
                    g_mean, a_mean = float(g.mean()), float(a.mean())
                    pi = math.sqrt(a_mean / g_mean) if g_mean > 0 and a_mean > 0 else 1.0
                    lam = (g + root / pi)[:, None] * (a + root * pi)[None, :]
                else:
                    lam = (g + root)[:, None] * (a + root)[None, :]
            if p < 0 and not transforms_active() and bool((lam.detach() <= 0).any()):
                raise ValueError(
                    f"{api_name(self._api + '.' + method)}: block {slot.name!r} of K + δI is singular (a zero "
                    f"eigenvalue), so a negative power is undefined; pass `damping` > 0."
                )
            values[slot.name] = _pow(lam, p).to(self.dtype)
        what = f"power({p}, damping=...)" if method == "power" else f"inverse(damping=..., mode={mode!r})"
        return _KronFunctionOperator(self, values, what, f"{self._api}.{method}")


def _sqrt(delta: Damping) -> Damping:
    return delta.sqrt() if isinstance(delta, torch.Tensor) else math.sqrt(delta)


def _pow(lam: torch.Tensor, p: float) -> torch.Tensor:
    if p == -1.0:
        return lam.reciprocal()
    if p == 1.0:
        return lam
    return lam.pow(p)


def _diag(M: torch.Tensor) -> torch.Tensor:
    return M if M.ndim == 1 else M.diagonal()


def _frob2(M: torch.Tensor) -> torch.Tensor:
    return M.square().sum()


class _KronFunctionOperator(_BlockDiagonal):
    """``f(K)`` block by block: ``Q diag(f(Λ)) Q^T`` in each block's cached eigenbasis."""

    def __init__(self, source: KroneckerOperatorBase, values: dict[str, torch.Tensor], what: str, api: str) -> None:
        self._source = source
        self._values = values
        self._what = what
        self._api = api
        self._layout = source._layout
        self._num_data = source._num_data
        self._slots = source._slots

    def _apply_block(self, slot: _Slot, X: torch.Tensor) -> torch.Tensor:
        Qg, Qa = (None, None) if slot.kind == "diagonal" else self._source._bases(slot.name, X.dtype)
        return _spectral_block(X, slot, Qg, Qa, self._values[slot.name].to(X.dtype))

    def diagonal(self, as_tree: bool = False) -> Any:
        """The exact diagonal (e.g. a Laplace posterior's marginal variances): ``(P,)``, or a
        pytree like ``params`` (``as_tree``)."""
        pieces = []
        for slot in self._slots:
            Qg, Qa = (None, None) if slot.kind == "diagonal" else self._source._bases(slot.name, self.dtype)
            pieces.append(_spectral_diagonal(slot, Qg, Qa, self._values[slot.name]))
        flat = torch.cat(pieces)
        return self.unflatten(flat) if as_tree else flat

    def trace(self) -> torch.Tensor:
        """The exact trace (the sum of the damped function's eigenvalues)."""
        return sum((v.sum() for v in self._values.values()), torch.zeros((), dtype=self.dtype, device=self.device))

    def __repr__(self) -> str:
        return f"{type(self._source).__name__}.{self._what}"


# -- a tiny operator for the doctests ----------------------------------------------------------


def toy_kron_operator(seed: int = 0) -> KroneckerOperatorBase:
    """A small float64 operator with a Kronecker block (2x3 weight + 2 bias in a G-only block)
    and a diagonal block, from random PSD factors (for examples and tests)."""
    gen = torch.Generator().manual_seed(seed)

    def psd(k: int) -> torch.Tensor:
        X = torch.randn(k, k + 1, generator=gen, dtype=torch.float64)
        return X @ X.T / (k + 1)

    params = {
        "w": torch.zeros(2, 3, dtype=torch.float64),
        "b": torch.zeros(2, dtype=torch.float64),
        "s": torch.zeros(4, dtype=torch.float64),
    }
    blocks = {
        "w": KronBlock(("w",), psd(2), psd(3)),
        "b": KronBlock(("b",), psd(2), None),
        "s": KronBlock(("s",), torch.rand(4, generator=gen, dtype=torch.float64), None),
    }
    return _ToyKron(params, blocks)


class _ToyKron(KroneckerOperatorBase):
    def __init__(self, params: dict[str, torch.Tensor], blocks: dict[str, KronBlock]) -> None:
        from ._params import Layout

        self._api = "functx.curvature.KroneckerOperatorBase"
        self._layout = Layout(params, self._api)
        self._num_data = 1
        self._set_blocks(blocks)
