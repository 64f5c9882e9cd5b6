"""Batches of a dataset: iteration (with an optional progress bar), batch sizes and sample counts."""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch


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
            kind = "a one-shot iterator" if isinstance(data, Iterator) else f"a value of type {type(data).__name__}"
            raise TypeError(
                f"`{api}`: `data` must be a re-iterable of (X, y) batches (a list or a DataLoader), got {kind}."
            )
        if batch_size_fn is not None and not callable(batch_size_fn):
            raise TypeError(
                f"`{api}`: `batch_size_fn` must be a callable X -> int, got {type(batch_size_fn).__name__}."
            )
        if not isinstance(progress, bool):
            raise TypeError(f"`{api}`: `progress` must be True or False, got {progress!r}.")
        self.data, self.batch_size_fn, self.device, self.api = data, batch_size_fn, device, api
        self.progress = progress and _tqdm_available(api)

    def batches(self, desc: str) -> Iterator[tuple[Any, torch.Tensor, int]]:
        """Yield ``(X, y, batch_size)`` for each batch of one pass over the data."""
        source: Iterable[Any] = self.data
        if self.progress:
            from tqdm.auto import tqdm  # optional extra, imported only when asked for

            source = tqdm(source, desc=f"{self.api} {desc}", leave=False)
        for k, item in enumerate(source):
            X, y = self._unpack(item, k)
            yield X, y, self.batch_size(X, k)

    def _unpack(self, item: Any, k: int) -> tuple[Any, Any]:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"`{self.api}`: batch {k} of `data` must be a pair (X, y), got {_describe(item)}.")
        X, y = item
        if isinstance(X, torch.Tensor):
            X = X.to(self.device)
        if isinstance(y, torch.Tensor):
            y = y.to(self.device)
        return X, y

    def batch_size(self, X: Any, k: int) -> int:
        """The number of samples in batch ``k`` (``batch_size_fn(X)`` or ``X.shape[0]``)."""
        if self.batch_size_fn is not None:
            size = self.batch_size_fn(X)
        elif isinstance(X, torch.Tensor) and X.ndim > 0:
            size = X.shape[0]
        else:
            hint = " (dict-like X needs `batch_size_fn`)" if isinstance(X, Mapping) else ""
            raise TypeError(
                f"`{self.api}`: cannot tell the batch size of X in batch {k}, a {_describe(X)}{hint}; "
                f"pass `batch_size_fn=lambda X: ...`."
            )
        if isinstance(size, torch.Tensor) and size.numel() == 1:
            size = int(size.item())
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"`{self.api}`: the batch size of batch {k} must be an int >= 0, got {size!r}.")
        return size

    def count(self) -> int:
        """The number of samples in this process's data (one pass, no model evaluation)."""
        return sum(size for _, _, size in self.batches("counting samples"))


def _tqdm_available(api: str) -> bool:
    if importlib.util.find_spec("tqdm") is not None:
        return True
    warnings.warn(
        f"`{api}`: progress=True needs tqdm, which is not installed (`pip install functx[progress]`); "
        f"running without a progress bar.",
        UserWarning,
        stacklevel=4,
    )
    return False


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)}"
    return f"value of type {type(value).__name__}"
