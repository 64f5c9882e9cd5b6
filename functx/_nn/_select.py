"""Selecting part of a dict of named tensors (``partition``) and merging it back (``combine``)."""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

import torch

from .._validate import check_instance, describe, fail

Filter = Union[str, "re.Pattern[str]", Iterable[str], Callable[[str, torch.Tensor], bool]]


def partition(tree: Mapping[str, Any], filter: Filter, /) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a dict of named tensors into ``(selected, rest)``.

    Args:
        tree: a dict keyed by names, such as the ``params`` or ``buffers`` returned by
            :func:`functx.nn.make_functional`.
        filter: which names to select: a glob pattern (``"fc2.*"``, matched against the
            whole name with :func:`fnmatch.fnmatchcase`), a compiled regular expression
            (selects names it ``search``-es), an iterable of globs or exact names (such as
            ``fmodel.trainable``), or a callable ``(name, tensor) -> bool``. A pattern or
            name that matches nothing raises ``ValueError`` (it is most likely a typo).

    Returns:
        ``(selected, rest)``: two dicts, each a valid pytree for the transforms; merge them
        back with :func:`combine`.

    Example:
        >>> import torch, functx.nn
        >>> params = {"fc1.weight": torch.ones(2, 2), "fc1.bias": torch.zeros(2), "fc2.weight": torch.ones(1, 2)}
        >>> head, body = functx.nn.partition(params, "fc2.*")
        >>> sorted(head), sorted(body)
        (['fc2.weight'], ['fc1.bias', 'fc1.weight'])
        >>> weights, _ = functx.nn.partition(params, lambda name, t: t.dim() == 2)
        >>> sorted(weights)
        ['fc1.weight', 'fc2.weight']
    """
    check_instance(tree, Mapping, "tree", "nn.partition", "a dict keyed by names")
    keep = _predicate(filter, list(tree))
    selected: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for name, value in tree.items():
        (selected if keep(name, value) else rest)[name] = value
    return selected, rest


def combine(*trees: Mapping[str, Any]) -> dict[str, Any]:
    """Merge dicts of named tensors (the inverse of :func:`partition`).

    Args:
        *trees: dicts with disjoint keys.

    Returns:
        One dict holding every entry.

    Example:
        >>> import torch, functx.nn
        >>> merged = functx.nn.combine({"a": torch.zeros(1)}, {"b": torch.ones(1)})
        >>> sorted(merged)
        ['a', 'b']
    """
    merged: dict[str, Any] = {}
    for i, tree in enumerate(trees):
        check_instance(tree, Mapping, f"trees[{i}]", "nn.combine", "a dict keyed by names")
        for name, value in tree.items():
            if name in merged:
                raise ValueError(
                    f"`functx.nn.combine`: {name!r} appears in more than one argument (again in argument "
                    f"{i}); the parts must be disjoint, as `functx.nn.partition` returns them."
                )
            merged[name] = value
    return merged


def _predicate(filter: Any, names: list[str]) -> Callable[[str, Any], bool]:
    if isinstance(filter, re.Pattern):
        _check_matches([filter.pattern], names, lambda pattern, name: filter.search(name) is not None)
        return lambda name, _: filter.search(name) is not None
    if isinstance(filter, str):
        filter = (filter,)
    if callable(filter):
        return lambda name, value: bool(filter(name, value))
    if isinstance(filter, Iterable) and not isinstance(filter, (bytes, Mapping)):
        patterns = list(filter)
        if all(isinstance(p, str) for p in patterns):
            _check_matches(patterns, names, lambda pattern, name: fnmatch.fnmatchcase(name, pattern))
            exact = frozenset(patterns)
            globs = [p for p in patterns if any(c in p for c in "*?[")]
            return lambda name, _: name in exact or any(fnmatch.fnmatchcase(name, g) for g in globs)
    raise fail(
        "nn.partition",
        "`filter` must be a glob string, a compiled regular expression, an iterable of strings or a callable "
        f"(name, tensor) -> bool, got {describe(filter)}.",
        TypeError,
    )


def _check_matches(patterns: list[str], names: list[str], match: Callable[[str, str], bool]) -> None:
    for pattern in patterns:
        if not any(match(pattern, name) for name in names):
            close = difflib.get_close_matches(pattern, names, n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"`functx.nn.partition`: the filter {pattern!r} matches no name.{hint}")
