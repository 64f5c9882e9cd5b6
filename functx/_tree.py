"""The one place where functx decides what a pytree is, plus a little tree algebra.

Policy (used by every transform):

* Pytrees are flattened with :mod:`optree` in the ``"functx"`` namespace. That
  namespace sees every node type registered globally with optree *and* every type
  registered under ``namespace="functx"``, for example::

      @optree.dataclasses.dataclass(namespace="functx")
      class Params:
          w: torch.Tensor
          b: torch.Tensor

* ``None`` is an empty subtree (optree's default), never a leaf.
* Dict keys are sorted when flattening; the original key order is restored when
  unflattening. Two dicts with the same keys have the same structure whatever the
  insertion order.
* Only flat tuples of tensors cross into ``torch.func``; structures are rebuilt with
  optree on the way out.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import optree
import torch

NAMESPACE = "functx"

PyTree = Any
TreeSpec = optree.PyTreeSpec


def tree_flatten(tree: PyTree) -> tuple[list[Any], TreeSpec]:
    """Flatten ``tree`` under functx's policy; returns ``(leaves, treespec)``."""
    return optree.tree_flatten(tree, namespace=NAMESPACE)


def tree_unflatten(treespec: TreeSpec, leaves: Any) -> PyTree:
    """Inverse of :func:`tree_flatten`."""
    return treespec.unflatten(leaves)


def tree_leaves(tree: PyTree) -> list[Any]:
    return optree.tree_leaves(tree, namespace=NAMESPACE)


def tree_structure(tree: PyTree) -> TreeSpec:
    return optree.tree_structure(tree, namespace=NAMESPACE)


def leaf_paths(tree: PyTree, root: str) -> list[str]:
    """Human-readable key paths of the leaves of ``tree``, e.g. ``"params['w'][0]"``."""
    accessors, _, _ = optree.tree_flatten_with_accessor(tree, namespace=NAMESPACE)
    return [accessor.codify(root) for accessor in accessors]


def spec_paths(treespec: TreeSpec, root: str) -> list[str]:
    return [accessor.codify(root) for accessor in optree.treespec_accessors(treespec)]


def describe(value: Any) -> str:
    """Short description of a value for error messages."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a value of type {type(value).__name__}"


def structure_mismatch(expected: TreeSpec, tree: PyTree, root: str) -> str:
    """Explain how ``tree`` differs from ``expected``, naming the first differing key path."""
    got = tree_structure(tree)
    want_paths, got_paths = spec_paths(expected, root), spec_paths(got, root)
    for want, have in zip(want_paths, got_paths):
        if want != have:
            return f"leaf {want!r} expected but {have!r} found"
    if len(want_paths) != len(got_paths):
        longer, which = (want_paths, "missing") if len(want_paths) > len(got_paths) else (got_paths, "unexpected")
        return f"{which} leaf {longer[min(len(want_paths), len(got_paths))]!r}"
    return "node types differ (for example a list where a tuple was expected)"


def broadcast_prefix(prefix: PyTree, tree: PyTree, root: str, what: str, api: str) -> list[Any]:
    """Broadcast ``prefix`` (whose ``None`` entries are leaves) to the leaves of ``tree``.

    Used for ``in_dims``/``out_dims``. Raises ``ValueError`` naming ``api`` and ``what`` when
    ``prefix`` is not a tree prefix of ``tree``.
    """
    marked = optree.tree_map(lambda d: _NONE if d is None else d, prefix, none_is_leaf=True, namespace=NAMESPACE)
    try:
        dims = optree.broadcast_prefix(marked, tree, namespace=NAMESPACE)
    except ValueError as err:
        raise ValueError(
            f"`functx.{api}`: `{what}` must be a tree prefix of {root}, got {what}={prefix!r}. optree says: {err}"
        ) from None
    return [None if d is _NONE else d for d in dims]


class _NoneMarker:
    def __repr__(self) -> str:  # pragma: no cover - never shown to users
        return "None"


_NONE = _NoneMarker()


# --------------------------------------------------------------------------------------
# Tree algebra.


def tree_vdot(x: PyTree, y: PyTree) -> torch.Tensor:
    """Real inner product ``sum(conj(x) * y)`` over all leaves, as a 0-d tensor."""
    terms = [torch.vdot(a.reshape(-1), b.reshape(-1)) for a, b in zip(tree_leaves(x), tree_leaves(y))]
    if not terms:
        return torch.zeros(())
    return functools.reduce(torch.add, terms)


def ravel_pytree(tree: PyTree) -> tuple[torch.Tensor, Callable[[torch.Tensor], PyTree]]:
    """Flatten a pytree of tensors into one 1-D tensor and return the inverse.

    Args:
        tree: a pytree whose leaves are tensors (promoted to a common dtype when raveled).

    Returns:
        ``(flat, unravel)``: ``flat`` is the concatenation of the raveled leaves and
        ``unravel(flat)`` rebuilds a tree of the same structure, shapes and dtypes.

    Example:
        >>> import torch, functx
        >>> flat, unravel = functx.ravel_pytree({"w": torch.ones(2, 2), "b": torch.zeros(3)})
        >>> flat.shape
        torch.Size([7])
        >>> unravel(flat)["w"].shape
        torch.Size([2, 2])
    """
    leaves, treespec = tree_flatten(tree)
    shapes = [leaf.shape for leaf in leaves]
    dtypes = [leaf.dtype for leaf in leaves]
    sizes = [math.prod(shape) for shape in shapes]
    if leaves:
        dtype = functools.reduce(torch.promote_types, dtypes)
        flat = torch.cat([leaf.reshape(-1).to(dtype) for leaf in leaves])
    else:
        flat = torch.zeros(0)

    def unravel(vector: torch.Tensor) -> PyTree:
        pieces = torch.split(vector, sizes) if leaves else []
        return tree_unflatten(treespec, [p.reshape(s).to(d) for p, s, d in zip(pieces, shapes, dtypes)])

    return flat, unravel
