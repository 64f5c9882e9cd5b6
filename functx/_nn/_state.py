"""Buffers: cloned before each call, updates detected after it.

Buffers are cloned before the call, so in-place updates (BatchNorm's running statistics)
land in the clones; an update is detected by identity (the buffer was reassigned) or by
the version counters of the clone and of every functorch wrapper under it (``vmap`` alone
does not bump the outer counter).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import _torch_internals
from ._plan import Plan


def clones(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Clones with version counters: made outside inference mode (inference tensors have
    none), still usable by a forward that runs in it."""
    if not tensors or not torch.is_inference_mode_enabled():
        return [t.clone() for t in tensors]
    with torch.inference_mode(False):
        return [t.clone() for t in tensors]


def state_before(clone: torch.Tensor, given: torch.Tensor) -> Any:
    """What :func:`buffers_after` compares with: the version counters of ``clone`` and of
    every functorch wrapper level under it (``vmap`` alone does not bump the outer one),
    or, where ``functx._torch_internals.version`` is unavailable, the given buffer
    itself (then in-place updates are found by comparing values, in eager mode only)."""
    v = _torch_internals.version(clone)
    return given if v is None else v


def _changed_in_place(clone: torch.Tensor, before: Any) -> bool:
    if not isinstance(before, torch.Tensor):
        return _torch_internals.version(clone) != before
    try:
        return not torch.equal(clone, before)
    except RuntimeError:  # under a transform values cannot be compared: identity and _norm_ran only
        return False


def buffers_after(
    plan: Plan, copies: list[nn.Module], clones: list[torch.Tensor], before: list[Any]
) -> tuple[list[torch.Tensor], set[int]]:
    """The buffers as the forward left them, and the groups it changed (reassigned, or
    changed in place as told by version counters and by :func:`_norm_ran`)."""
    finals, changed = list(clones), set()
    for node, c in zip(plan.nodes, copies):
        entries = c.__dict__["_buffers"]
        for k, g in node.buffers:
            now = entries.get(k)
            if g is None or g in changed:
                continue
            if now is not clones[g] and isinstance(now, torch.Tensor):
                finals[g] = now
                changed.add(g)
            elif _changed_in_place(clones[g], before[g]):
                changed.add(g)
        if node.norm and _norm_ran(dict(node.buffers), c.__dict__, changed):
            changed.update(g for k, g in node.buffers if k in ("running_mean", "running_var") and g is not None)
    return finals, changed


def _norm_ran(groups: dict[str, int | None], d: dict[str, Any], changed: set[int]) -> bool:
    """Whether a ``_NormBase`` (BatchNorm, InstanceNorm) updated its running statistics.
    ``batch_norm`` writes them without bumping their version counters, but BatchNorm's
    ``num_batches_tracked.add_(1)`` does bump its own."""
    nbt = groups.get("num_batches_tracked")
    if nbt is not None:
        return nbt in changed
    return bool(d.get("training")) and bool(d.get("track_running_stats"))
