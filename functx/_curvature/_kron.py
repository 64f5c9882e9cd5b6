"""STAND-IN for helper "kron"'s module (issue 17): the names of KRON_INTERFACE.md, minimal.

Only what ``_kfac`` needs to run: :class:`KronBlock`, :func:`factor_eigh` and
:class:`KroneckerOperatorBase` with ``_set_blocks``, ``blocks`` and ``_apply``. Replaced by the
real module when "kron" lands on main.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, NamedTuple

import torch

from ._base import CurvatureOperatorBase


class KronBlock(NamedTuple):
    """One Kronecker block (see KRON_INTERFACE.md)."""

    params: tuple[str, ...]
    G: torch.Tensor
    A: torch.Tensor | None
    eigenvalues: torch.Tensor | None = None
    transposed: bool = False


def factor_eigh(M: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(eigenvalues ascending, eigenvectors)`` of a symmetric factor (float64 for float32)."""
    dtype = dtype or _eigh_dtype(M.dtype)
    M = M.detach().to(dtype)
    if M.ndim == 1:
        return M, None
    values, vectors = torch.linalg.eigh((M + M.mT) / 2)
    return values, vectors


def _eigh_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.finfo(dtype).bits <= 32 else dtype


class KroneckerOperatorBase(CurvatureOperatorBase):
    """Block-diagonal operator of Kronecker blocks (stand-in)."""

    _blocks: dict[str, KronBlock]
    _eigh_dtype: torch.dtype | None = None

    def _set_blocks(self, blocks: dict[str, KronBlock], eigen: dict[str, tuple[Any, ...]] | None = None) -> None:
        self._blocks = dict(blocks)
        self._eigen_cache = dict(eigen or {})
        offsets, start = {}, 0
        for key, size in zip(self._layout.keys or [], self._layout.sizes):
            offsets[key] = (start, size)
            start += size
        self._spans = {
            name: (offsets[b.params[0]][0], sum(offsets[p][1] for p in b.params)) for name, b in blocks.items()
        }

    @property
    def blocks(self) -> MappingProxyType[str, KronBlock]:
        """Block name -> :class:`KronBlock` (read-only)."""
        return MappingProxyType(self._blocks)

    def _apply(self, V: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(V)
        for name, b in self._blocks.items():
            start, size = self._spans[name]
            X = V[:, start : start + size]
            if len(b.params) == 2:  # [W | b]: W's entries then b's -> the row-major vec of [W | b]
                m = b.G.shape[0]
                X = torch.cat([X[:, : size - m].reshape(-1, m, size // m - 1), X[:, size - m :, None]], 2)
                R = _block_apply(b, X.reshape(X.shape[0], -1), self._eigen_cache.get(name)).reshape(X.shape)
                out[:, start : start + size] = torch.cat([R[:, :, :-1].reshape(X.shape[0], -1), R[:, :, -1]], 1)
            else:
                out[:, start : start + size] = _block_apply(b, X, self._eigen_cache.get(name))
        return out


def _block_apply(b: KronBlock, X: torch.Tensor, eigen: Any = None) -> torch.Tensor:
    K = X.shape[0]
    if b.A is None and b.G.ndim == 1:  # diagonal block
        return X * b.G
    if b.A is None:  # G-only
        if b.eigenvalues is None:
            return X @ b.G
        Q = (eigen[1] if eigen else factor_eigh(b.G)[1]).to(X.dtype)  # type: ignore[union-attr]
        return ((X @ Q) * b.eigenvalues) @ Q.T
    m = b.G.shape[0]
    n = b.A.shape[0]
    M = X.reshape(K, n, m).transpose(1, 2) if b.transposed else X.reshape(K, m, n)
    if b.eigenvalues is None:
        R = b.G @ M
        R = R * b.A if b.A.ndim == 1 else R @ b.A
    else:
        QG = eigen[1] if eigen else factor_eigh(b.G)[1]
        QA = eigen[3] if eigen else factor_eigh(b.A)[1]
        QG = QG.to(X.dtype)  # type: ignore[union-attr]
        R = QG.T @ M
        if QA is not None:
            R = R @ QA.to(X.dtype)
        R = R * b.eigenvalues
        if QA is not None:
            R = R @ QA.to(X.dtype).T
        R = QG @ R
    if b.transposed:
        R = R.transpose(1, 2)
    return R.reshape(K, -1)
