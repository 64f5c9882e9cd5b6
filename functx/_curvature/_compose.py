"""Lazy algebra of curvature operators: ``A + B``, ``A - B``, ``c * A``, ``A @ B``.

Nothing is materialised: a product with the composite is the same combination of the
operands' products. Operands must act on the same flattening (same parameter names, shapes and
dtype); a scalar ``c`` is a real number or a 0-d tensor (kept, so it stays differentiable).
"""

from __future__ import annotations

from typing import Any

import torch

from .._validate import api_name, describe, is_number
from ._base import CurvatureOperatorBase

_API = "curvature"


class _Composite(CurvatureOperatorBase):
    def __init__(self, operands: tuple[CurvatureOperatorBase, ...], name: str) -> None:
        first = operands[0]
        for other in operands[1:]:
            if other._layout.signature() != first._layout.signature():
                raise ValueError(
                    f"{api_name(_API)}: `{name}` needs operators on the same parameters (names, shapes, dtype); "
                    f"got {type(first).__name__} on {first._layout.signature()} and {type(other).__name__} on "
                    f"{other._layout.signature()}."
                )
        self._operands = operands
        self._layout = first._layout
        self._api = f"functx.curvature.{name}"
        self._num_data = first._num_data

    def _check_v(self, v: torch.Tensor) -> None:
        for op in self._operands:
            op._check_v(v)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self._operands))})"


class SumOperator(_Composite):
    """``A + B`` (lazy)."""

    def __init__(self, a: CurvatureOperatorBase, b: CurvatureOperatorBase) -> None:
        super().__init__((a, b), "SumOperator")

    def _apply(self, V: torch.Tensor) -> torch.Tensor:
        a, b = self._operands
        return a._apply(V) + b._apply(V)


class ScaledOperator(_Composite):
    """``c * A`` (lazy)."""

    def __init__(self, c: float | torch.Tensor, a: CurvatureOperatorBase) -> None:
        super().__init__((a,), "ScaledOperator")
        self._c = c

    def _apply(self, V: torch.Tensor) -> torch.Tensor:
        return self._c * self._operands[0]._apply(V)

    def __repr__(self) -> str:
        return f"ScaledOperator({self._c!r}, {self._operands[0]!r})"


class ProductOperator(_Composite):
    """``A @ B`` (lazy): ``(A @ B) @ v = A @ (B @ v)``."""

    def __init__(self, a: CurvatureOperatorBase, b: CurvatureOperatorBase) -> None:
        super().__init__((a, b), "ProductOperator")

    def _apply(self, V: torch.Tensor) -> torch.Tensor:
        a, b = self._operands
        return a._apply(b._apply(V))


def add(a: Any, b: Any) -> Any:
    if not (isinstance(a, CurvatureOperatorBase) and isinstance(b, CurvatureOperatorBase)):
        return NotImplemented
    return SumOperator(a, b)


def scale(c: Any, a: Any) -> Any:
    if not isinstance(a, CurvatureOperatorBase):
        return NotImplemented
    if isinstance(c, torch.Tensor):
        if c.ndim != 0 or not c.is_floating_point():
            raise TypeError(f"{api_name(_API)}: a scalar times an operator needs a 0-d real tensor, got {describe(c)}.")
    elif not is_number(c):
        return NotImplemented
    return ScaledOperator(c, a)


def product(a: CurvatureOperatorBase, b: CurvatureOperatorBase) -> ProductOperator:
    return ProductOperator(a, b)
