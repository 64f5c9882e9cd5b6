"""The one place where the curvature room talks to ``torch.distributed``.

Every operator of :mod:`functx.curvature` goes through these functions and nothing else:

* :func:`resolve_group` once at construction (``None`` means "one process": every other
  function is then the identity and no collective runs);
* :func:`all_reduce_sum` once per product (``H @ v`` or a matrix product), on one flat buffer;
* :func:`global_count` once at construction (the global number of samples ``N``);
* :func:`any_rank` for checks that must raise on every rank together (determinism);
* :func:`check_same_across_ranks` once at construction (parameter names, shapes, dtypes).

Single-process stub: the distributed implementation replaces the bodies, not the signatures.
"""

from __future__ import annotations

from typing import Any

import torch


def resolve_group(group: Any, api: str) -> Any:
    """The process group products reduce over, or ``None`` when running as one process."""
    return None


def all_reduce_sum(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum ``tensor`` over the ranks of ``group`` (returns it unchanged for one process)."""
    return tensor


def global_count(count: int, group: Any) -> int:
    """Sum a per-rank sample count over the ranks of ``group``."""
    return count


def any_rank(flag: bool, group: Any) -> bool:
    """Whether ``flag`` is true on any rank of ``group`` (every rank gets the same answer)."""
    return flag


def check_same_across_ranks(signature: list[tuple[str, tuple[int, ...], torch.dtype]], group: Any, api: str) -> None:
    """Raise the same ``ValueError`` on every rank when ranks disagree on ``signature``
    (parameter names, shapes and dtypes)."""
