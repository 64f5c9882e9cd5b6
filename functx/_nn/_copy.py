"""The per-call shallow copy of the module tree, holding the given tensors.

A call builds a fresh shallow copy of every submodule (``object.__new__`` plus a copy of
the live ``__dict__`` with new ``_parameters``, ``_buffers`` and ``_modules`` dicts holding
the given tensors and the copied children) and calls the copied root. The user's module
is only read, so calls are thread-safe and an exception in ``forward`` leaves nothing to
restore. ``nn.RNNBase`` keeps ``_flat_weights`` (and weak references to them): refreshed
on the copy, so ``forward`` never calls ``flatten_parameters`` on the caller's tensors.
"""

from __future__ import annotations

import types
import weakref
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._convert import Fix
from ._plan import Plan


def build(
    plan: Plan, params: list[torch.Tensor], buffers: list[torch.Tensor], training: bool | None
) -> list[nn.Module]:
    """Fresh shallow copies of every node holding ``params``/``buffers``; root first."""
    nodes = plan.nodes
    copies = [object.__new__(node.cls) for node in nodes]
    for node, c in zip(nodes, copies):
        d = node.module.__dict__.copy()
        d["_parameters"] = {k: None if g is None else params[g] for k, g in node.params}
        d["_buffers"] = {k: None if g is None else buffers[g] for k, g in node.buffers}
        d["_modules"] = {k: None if j is None else copies[j] for k, j in node.children}
        if training is not None:
            d["training"] = training
        for kind, key, payload in node.fixes:
            d[key] = _fixed(kind, payload, d[key], copies)
        object.__setattr__(c, "__dict__", d)
        if node.rnn:
            _refresh_rnn(c, d)
    return copies


def _fixed(kind: Fix, payload: Any, value: Any, copies: list[nn.Module]) -> Any:
    if kind is Fix.MODULE:
        return copies[payload]
    if kind is Fix.METHOD:
        func, j = payload
        return types.MethodType(func, copies[j])
    hooks = value.copy()
    for hook_id, (func, j) in payload.items():
        hooks[hook_id] = types.MethodType(func, copies[j])
    return hooks


def _refresh_rnn(rnn: nn.Module, d: dict[str, Any]) -> None:
    """Point an RNN copy's cached ``_flat_weights`` at the given tensors (never calling
    ``flatten_parameters``, which would re-seat the caller's tensors on CUDA)."""
    flat = [getattr(rnn, name) if hasattr(rnn, name) else None for name in d["_flat_weights_names"]]
    d["_flat_weights"] = flat
    if "_flat_weight_refs" in d:
        d["_flat_weight_refs"] = [None if w is None else weakref.ref(w) for w in flat]


def check_no_parametrize_cache(plan: Plan, api: str) -> None:
    if plan.parametrized and _parametrize_cache_enabled():
        raise RuntimeError(
            f"`functx.nn.{api}`: called inside `torch.nn.utils.parametrize.cached()`, whose cache is "
            f"keyed by id(module); per-call module copies could reuse a stale entry. Call it outside "
            f"the context (each call computes every parametrization once per access)."
        )


def _parametrize_cache_enabled() -> bool:
    """Whether ``torch.nn.utils.parametrize.cached()`` is active: its private
    ``_cache_enabled`` counter. Where torch lacks it, ``False``: the call runs (each
    per-call copy computes its parametrizations afresh unless a stale cache entry is hit,
    which only that context manager creates)."""
    return bool(getattr(parametrize, "_cache_enabled", 0))
