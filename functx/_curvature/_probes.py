"""What every estimator of the curvature room shares: the operator protocol, argument checks and
the random probes.

The estimators accept any symmetric linear operator ``op`` with ``op.shape == (P, P)``,
``op.dtype``, ``op.device`` and ``op @ V`` for ``V`` of shape ``(P,)`` or ``(P, K)``, or a plain
square tensor. :class:`Operator` wraps it once per call: it validates the protocol, multiplies in
column chunks, checks every product's shape and dtype, and counts the products.

Probes come from ``seed`` through a private :class:`torch.Generator` on the operator's device: the
global random state is never read or advanced, and every rank of a ``torch.distributed`` run draws
the same probes.
"""

from __future__ import annotations

from typing import Any

import torch

from .._validate import describe, fail

SUPPORTED_DTYPES = (torch.float32, torch.float64)


class Operator:
    """A validated view of a symmetric linear operator (or a square tensor) that counts its products.

    Args:
        op: the user's operator or square tensor.
        api: the public name used in error messages, e.g. ``"curvature.eigsh"``.
        chunk_size: the most columns sent to ``op`` in one product (default: ``None``, all).
    """

    def __init__(self, op: Any, api: str, chunk_size: int | None = None) -> None:
        self.api = api
        self.op = op
        self.matvecs = 0  # columns multiplied
        self.calls = 0  # products (one per block of columns)
        self.chunk_size = chunk_size
        if isinstance(op, torch.Tensor):
            self._check_tensor(op)
        else:
            self._check_protocol(op)
        self.size = int(op.shape[0])
        self.dtype: torch.dtype = op.dtype
        self.device: torch.device = torch.device(op.device)
        self.eps = torch.finfo(self.dtype).eps

    def _check_tensor(self, op: torch.Tensor) -> None:
        if op.ndim != 2 or op.shape[0] != op.shape[1]:
            raise fail(self.api, f"`op` must be a square matrix (P, P), got a tensor of shape {tuple(op.shape)}.")
        self._check_dtype(op.dtype)
        self._check_size(tuple(op.shape))  # before the symmetry check, which needs an entry
        if op.layout == torch.strided and (op - op.mT).abs().amax() > 1e-5 * op.abs().amax():
            raise fail(self.api, "`op` must be symmetric, got a tensor with op != op.T.")

    def _check_protocol(self, op: Any) -> None:
        missing = [name for name in ("shape", "dtype", "device", "__matmul__") if not hasattr(op, name)]
        if missing:
            raise fail(
                self.api,
                f"`op` must be a square tensor or a linear operator with `shape`, `dtype`, `device` and `op @ V`, "
                f"got {describe(op)} without {', '.join(repr(m) for m in missing)}.",
                TypeError,
            )
        shape = tuple(op.shape)
        if len(shape) != 2 or not all(isinstance(s, int) for s in shape) or shape[0] != shape[1]:
            raise fail(self.api, f"`op.shape` must be a square (P, P) shape, got {shape}.")
        if not isinstance(op.dtype, torch.dtype):
            raise fail(self.api, f"`op.dtype` must be a torch.dtype, got {op.dtype!r}.", TypeError)
        self._check_dtype(op.dtype)
        self._check_size(shape)

    def _check_size(self, shape: tuple[int, ...]) -> None:
        if int(shape[0]) < 1:
            raise fail(self.api, f"`op` must have at least one row, got shape {shape}.")

    def _check_dtype(self, dtype: torch.dtype) -> None:
        if dtype not in SUPPORTED_DTYPES:
            raise fail(self.api, f"`op` must have dtype torch.float32 or torch.float64, got {dtype}.", TypeError)

    def matmul(self, block: torch.Tensor) -> torch.Tensor:
        """``op @ block`` for ``block`` of shape ``(P, K)``, in chunks of ``chunk_size`` columns."""
        if block.shape[1] == 0:
            return torch.zeros_like(block)
        step = self.chunk_size or block.shape[1]
        parts = [self._product(block[:, i : i + step]) for i in range(0, block.shape[1], step)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _product(self, block: torch.Tensor) -> torch.Tensor:
        out = self.op @ block.contiguous()
        if not isinstance(out, torch.Tensor):
            raise fail(self.api, f"`op @ V` must return a tensor, got {describe(out)}.", TypeError)
        if out.shape != block.shape:
            raise fail(
                self.api,
                f"`op @ V` must return the shape of V {tuple(block.shape)}, got shape {tuple(out.shape)}.",
            )
        if out.dtype != self.dtype:
            raise fail(self.api, f"`op @ V` must return op.dtype={self.dtype}, got dtype {out.dtype}.", TypeError)
        if not bool(torch.isfinite(out).all()):
            raise fail(self.api, "`op @ V` must return finite values, got inf or nan.")
        self.matvecs += block.shape[1]
        self.calls += 1
        return out

    def dense(self) -> torch.Tensor:
        """The matrix itself, from ``P`` products with the unit vectors (symmetrised)."""
        matrix = self.matmul(torch.eye(self.size, dtype=self.dtype, device=self.device))
        return (matrix + matrix.mT) / 2

    def require_unflatten(self) -> None:
        """A ``TypeError`` when the operator has no ``unflatten`` method."""
        if isinstance(self.op, torch.Tensor) or not callable(getattr(self.op, "unflatten", None)):
            raise fail(
                self.api,
                f"`op` must have an `unflatten` method for as_tree=True (the functx.curvature operators have one), "
                f"got {describe(self.op)}.",
                TypeError,
            )

    def unflatten(self, flat: torch.Tensor) -> Any:
        """The operator's own ``unflatten`` of a flat ``(P,)`` tensor."""
        self.require_unflatten()
        return self.op.unflatten(flat)

    def generator(self, seed: int) -> torch.Generator:
        """A fresh generator on the operator's device, seeded with ``seed``."""
        return torch.Generator(device=self.device).manual_seed(seed)

    def rademacher(self, columns: int, generator: torch.Generator) -> torch.Tensor:
        """``(P, columns)`` independent signs ±1 in the operator's dtype."""
        bits = torch.randint(0, 2, (self.size, columns), generator=generator, device=self.device)
        return bits.to(self.dtype).mul_(2).sub_(1)

    def gaussian(self, columns: int, generator: torch.Generator) -> torch.Tensor:
        """``(P, columns)`` independent standard normal entries in the operator's dtype."""
        return torch.randn(self.size, columns, generator=generator, device=self.device, dtype=self.dtype)
