"""The operator layer every curvature operator shares (curvlinops' ``_torch_base`` in spirit).

A subclass sets ``self._api`` (the public name after ``functx.``, e.g.
``"curvature.GGNOperator"``), ``self._layout`` (a :class:`~._params.Layout`) and
``self._num_data``, and implements :meth:`CurvatureOperatorBase._apply` on a ``(K, P)`` block
of row vectors. The base gives it ``shape``/``dtype``/``device``/``num_data``, ``@`` on a
vector ``(P,)``, a matrix ``(P, K)`` or a pytree like ``params``, ``flatten``/``unflatten``,
``to_dense``, ``to_scipy`` and the lazy algebra ``A + B``, ``A - B``, ``c * A``, ``A @ B``
(``_compose``).
"""

from __future__ import annotations

from typing import Any

import torch

from .._validate import api_name, describe, fail
from ._params import Layout

_DENSE_CHUNK = 64  # columns per product in to_dense()


class CurvatureOperatorBase:
    """A symmetric ``(P, P)`` linear operator on the flattening of ``params``."""

    _api: str
    _layout: Layout
    _num_data: int

    # -- what a subclass provides ------------------------------------------------------------

    def _apply(self, V: torch.Tensor) -> torch.Tensor:
        """``(A V^T)^T`` for ``V`` of shape ``(K, P)`` (``K >= 1``), in the operator's dtype."""
        raise NotImplementedError

    def _check_v(self, v: torch.Tensor) -> None:
        """Extra checks on a flat ``v`` before a product (e.g. refuse transforms); none here."""

    # -- the operator protocol -------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        """``(P, P)`` with ``P`` the number of entries of ``params``."""
        return (self._layout.size, self._layout.size)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of ``params`` (and of every product)."""
        return self._layout.dtype

    @property
    def device(self) -> torch.device:
        """The device of ``params`` (and of every product)."""
        return self._layout.device

    @property
    def num_data(self) -> int:
        """``N``: the number of samples over all processes (counted, or ``num_data``)."""
        return self._num_data

    def __matmul__(self, v: Any) -> Any:
        """Apply the operator to ``v``: a tensor ``(P,)``, a matrix ``(P, K)``, or a pytree
        shaped like ``params`` (leaves shaped like the parameters, or with a trailing ``K``
        axis); returns the same form. Another operator gives the lazy product ``A @ B``."""
        if isinstance(v, CurvatureOperatorBase):
            from ._compose import product

            return product(self, v)
        if isinstance(v, torch.Tensor):
            return self._matmul_flat(v)
        leaves = self._layout.tree_leaves(v, "v")
        columns = self._leaf_columns(leaves)
        flat = torch.cat([leaf.reshape(size, -1) for leaf, size in zip(leaves, self._layout.sizes)], dim=0)
        result = self._matmul_flat(flat if columns else flat[:, 0])
        pieces = result.split(self._layout.sizes, dim=0)
        shapes = [s + ((flat.shape[1],) if columns else ()) for s in self._layout.shapes]
        return self._layout.to_user([p.reshape(s) for p, s in zip(pieces, shapes)])

    def flatten(self, tree: Any) -> torch.Tensor:
        """The ``(P,)`` vector of a pytree shaped like ``params`` (flattening order of the operator)."""
        leaves = self._layout.tree_leaves(tree, "tree")
        for leaf, shape, path in zip(leaves, self._layout.shapes, self._layout.paths):
            if not isinstance(leaf, torch.Tensor) or tuple(leaf.shape) != shape:
                raise ValueError(
                    f"{api_name(self._api + '.flatten')}: the leaf for {path} must have shape {shape}, "
                    f"got {describe(leaf)}."
                )
        return torch.cat([leaf.reshape(-1) for leaf in leaves])

    def unflatten(self, flat: torch.Tensor) -> Any:
        """The pytree shaped like ``params`` of a ``(P,)`` vector (or ``(P, K)``: trailing ``K`` axes)."""
        flat = self._check_flat(flat)
        pieces = flat.split(self._layout.sizes, dim=0)
        return self._layout.to_user([p.reshape(s + flat.shape[1:]) for p, s in zip(pieces, self._layout.shapes)])

    def to_dense(self) -> torch.Tensor:
        """The ``(P, P)`` matrix, built from products with blocks of the identity (small ``P`` only)."""
        P = self._layout.size
        eye = torch.eye(P, dtype=self.dtype, device=self.device)
        return torch.cat([self @ eye[:, i : i + _DENSE_CHUNK] for i in range(0, P, _DENSE_CHUNK)], dim=1)

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` with this operator's products (scipy is
        imported here only)."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        np_dtype = torch.empty(0, dtype=self.dtype).numpy().dtype

        def matmat(x: Any) -> Any:
            t = torch.as_tensor(np.asarray(x, dtype=np_dtype), device=self.device)
            return (self @ t.reshape(self._layout.size, -1)).cpu().numpy()

        def matvec(x: Any) -> Any:
            return matmat(x)[:, 0]

        return LinearOperator(self.shape, matvec=matvec, rmatvec=matvec, matmat=matmat, rmatmat=matmat, dtype=np_dtype)

    # -- lazy algebra (see _compose) -------------------------------------------------------

    def __add__(self, other: Any) -> Any:
        from ._compose import add

        return add(self, other)

    def __radd__(self, other: Any) -> Any:
        from ._compose import add

        return add(other, self)

    def __sub__(self, other: Any) -> Any:
        from ._compose import add, scale

        return add(self, scale(-1.0, other))

    def __rsub__(self, other: Any) -> Any:
        from ._compose import add, scale

        return add(other, scale(-1.0, self))

    def __mul__(self, c: Any) -> Any:
        from ._compose import scale

        return scale(c, self)

    __rmul__ = __mul__

    def __neg__(self) -> Any:
        from ._compose import scale

        return scale(-1.0, self)

    # -- products ----------------------------------------------------------------------------

    def _matmul_flat(self, v: torch.Tensor) -> torch.Tensor:
        v = self._check_flat(v)
        self._check_v(v)
        columns = v.ndim == 2
        V = v.T.contiguous() if columns else v.unsqueeze(0)  # (K, P), each column contiguous
        if V.shape[0] == 0:
            return torch.zeros_like(v)
        result = self._apply(V.to(self.dtype))
        return result.T.contiguous() if columns else result[0]

    def _check_flat(self, v: torch.Tensor) -> torch.Tensor:
        P = self._layout.size
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{api_name(self._api)}: `v` must be a tensor or a pytree like params, got {describe(v)}.")
        if not v.is_floating_point():
            raise TypeError(f"{api_name(self._api)}: `v` must be a real floating-point tensor, got dtype {v.dtype}.")
        if v.ndim not in (1, 2) or v.shape[0] != P:
            raise ValueError(f"{api_name(self._api)}: `v` must have shape ({P},) or ({P}, K), got {tuple(v.shape)}.")
        return v.to(device=self.device)

    def _leaf_columns(self, leaves: list[Any]) -> bool:
        """Whether the leaves of a pytree ``v`` carry a trailing ``K`` axis (all or none)."""
        kinds: set[int | None] = set()
        for leaf, shape, path in zip(leaves, self._layout.shapes, self._layout.paths):
            if isinstance(leaf, torch.Tensor) and tuple(leaf.shape) == shape:
                kinds.add(None)
            elif isinstance(leaf, torch.Tensor) and leaf.ndim == len(shape) + 1 and tuple(leaf.shape[:-1]) == shape:
                kinds.add(leaf.shape[-1])
            else:
                raise ValueError(
                    f"{api_name(self._api)}: the leaf of `v` for {path} must have shape {shape} "
                    f"(or {shape} + (K,)), got {describe(leaf)}."
                )
        if len(kinds) > 1:
            raise ValueError(
                f"{api_name(self._api)}: the leaves of `v` mix vectors and matrices (trailing K axes {kinds})."
            )
        return kinds != {None}


def square_operator(op: Any, name: str, P: int, api: str) -> Any:
    """``V -> op @ V`` for a ``(P, P)`` operator given as a real floating-point tensor or as any
    object with ``shape`` and ``@`` (``K.inverse(damping)``, ``fc.InverseOperator(...)``);
    ``TypeError``/``ValueError`` naming ``name`` otherwise."""
    if isinstance(op, torch.Tensor):
        if not op.is_floating_point():
            raise fail(
                api, f"`{name}` must be a real floating-point tensor or an operator, got {describe(op)}.", TypeError
            )
        if tuple(op.shape) != (P, P):
            raise fail(
                api, f"`{name}` must have shape ({P}, {P}) (P = the number of entries of params), got {describe(op)}."
            )
        return lambda V: op @ V.to(op.dtype)
    shape = getattr(op, "shape", None)
    if shape is None or not hasattr(op, "__matmul__"):
        raise fail(
            api,
            f"`{name}` must be a (P, P) tensor or an operator with `shape` and `@` (K.inverse(damping), "
            f"fc.InverseOperator(...)), got {describe(op)}.",
            TypeError,
        )
    if tuple(shape) != (P, P):
        raise fail(
            api, f"`{name}` must have shape ({P}, {P}) (P = the number of entries of params), got shape {tuple(shape)}."
        )
    return lambda V: op @ V
