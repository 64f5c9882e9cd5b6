"""Batches of a dataset: iteration (with an optional progress bar), batch sizes and sample counts."""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from .._tree import tree_leaves
from .._validate import api_name, check_bool, check_callable, describe, fail


class Data:
    """A re-iterable of ``(X, y)`` batches with a batch-size rule, moved to one device.

    Args:
        data: the user's re-iterable of ``(X, y)`` pairs.
        batch_size_fn: ``X -> int``, or None for ``X.shape[0]`` (tensor ``X`` only).
        device: where tensor ``X`` and ``y`` are moved (a no-op when they are there).
        progress: wrap each pass in a tqdm bar (when tqdm is installed).
        api: the public name used in error messages.
    """

    def __init__(
        self,
        data: Any,
        batch_size_fn: Callable[[Any], int] | None,
        device: torch.device,
        progress: bool,
        api: str,
    ) -> None:
        if not isinstance(data, Iterable) or isinstance(data, Iterator):
            kind = "a one-shot iterator" if isinstance(data, Iterator) else describe(data)
            raise fail(
                api, f"`data` must be a re-iterable of (X, y) batches (a list or a DataLoader), got {kind}.", TypeError
            )
        check_callable(batch_size_fn, "batch_size_fn", api, optional=True)
        check_bool(progress, "progress", api)
        self.data, self.batch_size_fn, self.device, self.api = data, batch_size_fn, device, api
        self.progress = progress and _tqdm_available(api)

    def batches(self, desc: str) -> Iterator[tuple[Any, torch.Tensor, int]]:
        """Yield ``(X, y, batch_size)`` for each non-empty batch of one pass over the data."""
        for _, X, y, size in self.indexed_batches(desc):
            yield X, y, size

    def indexed_batches(self, desc: str, check_finite: bool = False) -> Iterator[tuple[int, Any, Any, int]]:
        """Yield ``(k, X, y, batch_size)`` for each batch ``k`` of one pass; batches of size 0
        are skipped (they add nothing to the curvature). With ``check_finite``, a ``ValueError``
        names a batch whose ``X`` or ``y`` holds a nan or an inf."""
        source: Iterable[Any] = self.data
        if self.progress:
            from tqdm.auto import tqdm  # optional extra, imported only when asked for

            source = tqdm(source, desc=f"{self.api} {desc}", leave=False)
        for k, item in enumerate(source):
            X, y = self._unpack(item, k)
            size = self.batch_size(X, k)
            if size == 0:
                continue
            if check_finite:
                self.check_finite(X, "X", k)
                self.check_finite(y, "y", k)
            yield k, X, y, size

    def check_finite(self, value: Any, what: str, k: int) -> None:
        """``ValueError`` naming batch ``k`` when a floating-point tensor of ``value`` is not finite."""
        for leaf in tree_leaves(value):
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and not _all_finite(leaf):
                raise fail(self.api, f"batch {k} of `data` must hold finite values, got a nan or inf in {what}.")

    def _unpack(self, item: Any, k: int) -> tuple[Any, Any]:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise fail(self.api, f"batch {k} of `data` must be a pair (X, y), got {describe(item)}.")
        X, y = item
        if isinstance(X, torch.Tensor):
            X = _usable(X.to(self.device))
        if isinstance(y, torch.Tensor):
            y = _usable(y.to(self.device))
        return X, y

    def batch_size(self, X: Any, k: int) -> int:
        """The number of samples in batch ``k`` (``batch_size_fn(X)`` or ``X.shape[0]``)."""
        if self.batch_size_fn is not None:
            size = self.batch_size_fn(X)
        elif isinstance(X, torch.Tensor) and X.ndim > 0:
            size = X.shape[0]
        else:
            hint = " (dict-like X needs `batch_size_fn`)" if isinstance(X, Mapping) else ""
            raise fail(
                self.api,
                f"`batch_size_fn` must be given when X is not a tensor with a batch axis{hint}, got X = "
                f"{describe(X)} in batch {k}; pass `batch_size_fn=lambda X: ...`.",
                TypeError,
            )
        if isinstance(size, torch.Tensor) and size.numel() == 1:
            size = int(size.item())
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise fail(self.api, f"the batch size of batch {k} must be an int >= 0, got {size!r}.")
        return size

    def count(self) -> int:
        """The number of samples in this process's data (one pass, no model evaluation; a
        ``ValueError`` names a batch with a nan or inf in ``X`` or ``y``)."""
        return sum(size for _, _, _, size in self.indexed_batches("counting samples", check_finite=True))


def _tqdm_available(api: str) -> bool:
    if importlib.util.find_spec("tqdm") is not None:
        return True
    warnings.warn(
        f"{api_name(api)}: progress=True needs tqdm, which is not installed (`pip install functx[progress]`); "
        f"running without a progress bar.",
        UserWarning,
        stacklevel=4,
    )
    return False


def _usable(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a normal copy of an inference tensor (which autograd cannot save for backward)."""
    if not t.is_inference():
        return t
    with torch.inference_mode(False):
        return t.clone()


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every entry is finite: a nan or inf makes the sum non-finite, so a finite sum
    settles it (50 times faster than ``isfinite(t).all()`` on CPU); an overflowing sum of finite
    entries falls back to the elementwise check."""
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())
