"""The tensors of one call: ``params``/``buffers`` dicts resolved to the plan's groups.

The common case (exactly the canonical names) is one list comprehension; otherwise names
are resolved through the aliases of tied tensors, and every mistake gets its message.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .._validate import check_keys, describe, fail
from ._plan import Group, Plan, raise_if_changed


def resolve(group: Group, given: Any, plan: Plan, api: str) -> list[torch.Tensor]:
    """The tensors of ``given`` (a dict keyed by names of ``group``) in group order."""
    if not isinstance(given, Mapping):
        if given is None and not group.names:
            return []
        hint = ""
        if isinstance(given, Iterable) and not isinstance(given, (str, bytes, torch.Tensor)):
            hint = (
                f" A {group.kind} sequence such as `model.{group.noun}s()` carries no names: pass "
                f"`dict(model.named_{group.noun}s())`."
            )
        raise fail(
            f"nn.{api}",
            f"`{group.kind}` must be a dict of tensors keyed by names as in `named_{group.noun}s()`, got "
            f"{describe(given)}.{hint}",
            TypeError,
        )
    if given.keys() == group.keyset:  # the common case: exactly the canonical names
        values = [given[k] for k in group.names]
    else:
        values = _resolve_aliases(group, given, plan, api)
    for k, (v, shape) in enumerate(zip(values, group.shapes)):
        if not isinstance(v, torch.Tensor) or v.shape != shape:
            _bad_value(group, k, v, plan, api)
    return values


def _resolve_aliases(group: Group, given: Mapping[str, Any], plan: Plan, api: str) -> list[Any]:
    check_keys(given, group.kind, f"nn.{api}", f" Use the names of `named_{group.noun}s()`.")
    values: list[Any] = [None] * len(group.names)
    seen: list[str | None] = [None] * len(group.names)
    for key, value in given.items():
        k = group.aliases.get(key)
        if k is None:
            raise _unknown_key(group, key, plan, api)
        if seen[k] is not None and values[k] is not value:
            raise ValueError(
                f"`functx.nn.{api}`: {group.kind}[{seen[k]!r}] and {group.kind}[{key!r}] are tied (one "
                f"tensor in the module) but were given different tensors. Pass one tensor per tied "
                f"group, under {group.names[k]!r}."
            )
        values[k], seen[k] = value, key
    missing = [n for n, s in zip(group.names, seen) if s is None]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(
            f"`functx.nn.{api}`: `{group.kind}` is missing {shown}. Every tensor must be given; merge "
            f"a selection back with `functx.nn.combine(selected, rest)`."
        )
    return values


def _unknown_key(group: Group, key: str, plan: Plan, api: str) -> ValueError:
    if key in plan.virtual and group.kind == "params":
        return ValueError(
            f"`functx.nn.{api}`: params[{key!r}] is computed by a parametrization "
            f"(torch.nn.utils.parametrize) and cannot be overridden by its plain name; pass its "
            f"original tensor(s) {plan.virtual[key]} instead."
        )
    other = plan.buffers if group is plan.params else plan.params
    close = difflib.get_close_matches(key, group.names, n=3)
    if key in other.aliases:
        hint = f" It is a {other.noun}: pass it in `{other.kind}`."
    else:
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(f"`functx.nn.{api}`: {group.kind}[{key!r}] is not a {group.noun} of the module.{hint}")


def _bad_value(group: Group, k: int, value: Any, plan: Plan, api: str) -> None:
    name = group.names[k]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`functx.nn.{api}`: {group.kind}[{name!r}] must be a tensor, got {describe(value)}.")
    raise_if_changed(plan, api)  # a tensor of the module re-seated in place with another shape
    raise ValueError(
        f"`functx.nn.{api}`: {group.kind}[{name!r}] has shape {tuple(value.shape)} but the module's "
        f"tensor has shape {tuple(group.shapes[k])}. (Stacked ensemble parameters are called "
        f"through `functx.vmap`.)"
    )
