"""The one place where functx decides what a pytree is, checks one against another, and
does the little tree algebra every room needs.

Policy (used by every transform and every room):

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

The boundary API (private; every room routes its checks through it):

* :func:`flatten_like` ``(tree, spec, like, *, name, api, ref=..., root=None, what=None)``:
  the one validator. Flattens ``tree`` (a user's tangents, cotangents, a callable's
  result ...) and checks it against a reference: the structure ``spec`` and the reference
  leaves ``like`` (``None`` entries in ``like`` are not checked). Wrong structure or shape:
  ``ValueError``; a leaf that is not a tensor, or has the wrong dtype: ``TypeError``.
  Every message starts with ``functx.<api>``, names ``name`` (the argument) and gives the
  key path of the offending leaf (rooted at ``root``, default ``name``) and, for
  structures, the first differing key path.
* :func:`check_float_leaves` ``(leaves, paths, *, api, what="", hint=None)``: the one
  leaf check: "every leaf is a floating-point or complex tensor", ``TypeError`` naming the
  key path, with a fix from :func:`input_hint` unless ``hint`` is given. ``paths`` may be a
  callable (computed only on failure). :func:`flatten_float` flattens and checks in one go.
* :class:`FlatLayout` and :func:`ravel_pytree`: the one ravel (pytree <-> one 1-D tensor).
  ``FlatLayout(leaves, spec, name=, api=)`` keeps shapes, dtypes, the promoted dtype and
  sizes; ``ravel_leaves`` concatenates leaves already checked with :func:`flatten_like`;
  ``unravel`` checks the length (``ValueError``) and restores per-leaf dtypes. The solvers'
  layout can subclass it.
* Callables are checked with ``functx._core.check_callable(func, name, api, optional=False)``.
* :func:`tree_norm`, :func:`tree_vdot`, :func:`tree_add`, :func:`tree_sub`,
  :func:`tree_scale`, :func:`tree_axpy`, :func:`tree_zeros_like`: public tree algebra
  (exported from :mod:`functx`); binary operations check their second tree with
  :func:`flatten_like`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import optree
import torch

from ._validate import describe

NAMESPACE = "functx"

PyTree: TypeAlias = Any
"""Any pytree (optree's ``"functx"`` namespace); for readers, it checks nothing."""
TensorTree: TypeAlias = Any
"""A pytree whose leaves are tensors; for readers, it checks nothing."""
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
# The boundary: one leaf check and one validator.


def is_differentiable(leaf: Any) -> bool:
    """Whether ``leaf`` is a floating-point or complex tensor."""
    return isinstance(leaf, torch.Tensor) and (leaf.is_floating_point() or leaf.is_complex())


def input_hint(leaf: Any) -> str:
    """How to fix a leaf that cannot be differentiated."""
    if isinstance(leaf, torch.Tensor):
        return "Convert it with `.float()`, or pass it in an argument not listed in `argnums`."
    if isinstance(leaf, torch.nn.Module):
        return "Use `functx.nn.make_functional(module)` to get its parameters as a dict of tensors."
    if dataclasses.is_dataclass(leaf):
        return (
            "Dataclasses are pytrees only when registered: decorate the class with "
            "`@optree.dataclasses.dataclass(namespace='functx')`."
        )
    return "Pass non-tensor values in an argument not listed in `argnums`, or close over them."


Paths = Sequence[str] | Callable[[], Sequence[str]]


def check_float_leaves(
    leaves: Sequence[Any], paths: Paths, *, api: str, what: str = "", hint: str | None = None
) -> None:
    """Raise ``TypeError`` unless every leaf is a floating-point or complex tensor.

    Args:
        leaves: the flat leaves.
        paths: their key paths, or a callable returning them (called only on failure).
        api: the API name for the message (``functx.<api>``).
        what: words put before the key path, e.g. ``"differentiated input "``.
        hint: how to fix it; :func:`input_hint` of the offending leaf when ``None``.
    """
    for k, leaf in enumerate(leaves):
        if not is_differentiable(leaf):
            path = (paths() if callable(paths) else paths)[k]
            fix = input_hint(leaf) if hint is None else hint
            raise TypeError(
                f"`functx.{api}`: {what}{path} must be a floating-point or complex tensor, got {describe(leaf)}."
                + (f" {fix}" if fix else "")
            )


def flatten_float(
    tree: PyTree, *, name: str, api: str, root: str | None = None, nonempty: bool = False, hint: str | None = None
) -> tuple[list[torch.Tensor], TreeSpec]:
    """Flatten ``tree`` and check every leaf with :func:`check_float_leaves`.

    ``nonempty=True`` also refuses a tree without leaves (``ValueError``).
    """
    leaves, spec = tree_flatten(tree)
    if nonempty and not leaves:
        raise ValueError(f"`functx.{api}`: `{name}` must contain at least one tensor, got {tree!r}.")
    check_float_leaves(leaves, lambda: leaf_paths(tree, root or name), api=api, hint=hint)
    return leaves, spec


def same_structure(a: Any, b: Any) -> bool:
    """Whether two tree structures are the same tree: the same node types, keys and leaves
    in the same places, whatever namespace each spec was built in or how it spells it.

    Equal specs are the common case (one comparison); otherwise the nodes are compared one by
    one. This accepts the specs Dynamo's optree polyfill builds across a ``torch.compile``
    graph break (``PyTreeSpec(*, namespace='')`` for ``PyTreeSpec(*)``), which are not
    ``optree.PyTreeSpec`` objects and do not compare equal to them.
    """
    if a is b or a == b:
        return True
    try:
        return _same_node(a, b)
    except (AttributeError, TypeError):  # not a tree structure
        return False


def _same_node(a: Any, b: Any) -> bool:
    if a.num_leaves != b.num_leaves or a.num_nodes != b.num_nodes or a.none_is_leaf != b.none_is_leaf:
        return False
    if a.is_leaf() or b.is_leaf():
        return bool(a.is_leaf() and b.is_leaf())
    if a.type is not b.type or list(a.entries()) != list(b.entries()):
        return False
    return all(_same_node(x, y) for x, y in zip(a.children(), b.children()))


def flatten_like(
    tree: PyTree,
    spec: TreeSpec,
    like: Sequence[torch.Tensor | None],
    *,
    name: str,
    api: str,
    ref: str = "the reference",
    root: str | None = None,
    what: str | None = None,
) -> list[Any]:
    """Flatten ``tree`` and check it against a reference structure and reference leaves.

    Args:
        tree: the pytree to check (tangents, cotangents, a callable's result ...).
        spec: the structure ``tree`` must have.
        like: one reference per leaf of ``spec``: anything with ``.shape`` and ``.dtype``
            (a tensor, or ``torch.empty(shape, dtype=dtype, device="meta")`` when only the
            layout is kept); ``tree``'s leaf must be a tensor of the same shape and dtype. A
            ``None`` entry accepts anything at that position.
        name: the argument's name, for messages (``"tangents"``).
        api: the API name, for messages (``functx.<api>``).
        ref: what the reference is, for messages (``"the primals"``).
        root: the root of the key paths in messages. (default: ``name``)
        what: how ``tree`` is named in messages. (default: ```name``` in backticks)

    Returns:
        The leaves of ``tree``.

    Raises:
        ValueError: wrong structure or shape. TypeError: a leaf that is not a tensor or
        has the wrong dtype.
    """
    leaves, got = tree_flatten(tree)
    if got != spec and not same_structure(got, spec):
        root = root or name
        raise ValueError(
            f"`functx.{api}`: {what or f'`{name}`'} must have the same tree structure as {ref}: "
            f"{structure_mismatch(spec, tree, root)}. Expected {spec}, got {got}."
        )
    for k, (leaf, want) in enumerate(zip(leaves, like)):
        if want is None or (isinstance(leaf, torch.Tensor) and leaf.shape == want.shape and leaf.dtype == want.dtype):
            continue
        _leaf_mismatch(leaf, want, leaf_paths(tree, root or name)[k], api=api, ref=ref)
    return leaves


def _leaf_mismatch(leaf: Any, want: torch.Tensor, path: str, *, api: str, ref: str) -> None:
    if not isinstance(leaf, torch.Tensor):
        raise TypeError(f"`functx.{api}`: {path} must be a tensor, got {describe(leaf)}.")
    if leaf.shape != want.shape:
        raise ValueError(
            f"`functx.{api}`: {path} has shape {tuple(leaf.shape)} but the corresponding leaf of {ref} "
            f"has shape {tuple(want.shape)}."
        )
    raise TypeError(
        f"`functx.{api}`: {path} has dtype {leaf.dtype} but the corresponding leaf of {ref} has dtype "
        f"{want.dtype}; cast it with `.to({want.dtype})`."
    )


# --------------------------------------------------------------------------------------
# Ravel: pytree <-> one 1-D tensor.


class FlatLayout:
    """The layout of a list of tensor leaves as one 1-D tensor.

    Leaves are raveled and concatenated in order, promoted to one common dtype;
    :meth:`unravel` restores shapes and per-leaf dtypes. ``name``/``api`` name the layout
    in error messages.
    """

    def __init__(self, leaves: Sequence[Any], spec: TreeSpec, *, name: str = "tree", api: str = "ravel_pytree"):
        for k, leaf in enumerate(leaves):
            if not isinstance(leaf, torch.Tensor):
                path = leaf_paths(tree_unflatten(spec, list(leaves)), name)[k]
                raise TypeError(f"`functx.{api}`: {path} must be a tensor, got {describe(leaf)}.")
        self.spec, self.name, self.api = spec, name, api
        self.shapes = [leaf.shape for leaf in leaves]
        self.dtypes = [leaf.dtype for leaf in leaves]
        self.sizes = [leaf.numel() for leaf in leaves]
        self.size = sum(self.sizes)
        self.dtype = functools.reduce(torch.promote_types, self.dtypes) if leaves else torch.get_default_dtype()
        self.real_dtype = self.dtype.to_real() if self.dtype.is_complex else self.dtype
        self.uniform = all(d == self.dtype for d in self.dtypes)  # no casts needed
        self.device = leaves[0].device if leaves else torch.device("cpu")

    def ravel_leaves(self, leaves: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate ``leaves`` (already checked to match this layout)."""
        if not leaves:
            return torch.zeros(0, dtype=self.dtype, device=self.device)
        if len(leaves) == 1:
            return leaves[0].reshape(-1)
        if self.uniform:
            return torch.cat([leaf.reshape(-1) for leaf in leaves])
        return torch.cat([leaf.reshape(-1).to(self.dtype) for leaf in leaves])

    def unravel(self, flat: Any) -> PyTree:
        """Rebuild the pytree from a 1-D tensor of length :attr:`size` (``ValueError`` otherwise)."""
        if not isinstance(flat, torch.Tensor):
            raise TypeError(f"`functx.{self.api}`: `unravel` takes a 1-D tensor, got {describe(flat)}.")
        if flat.dim() != 1 or flat.shape[0] != self.size:
            raise ValueError(
                f"`functx.{self.api}`: `unravel` takes a 1-D tensor of length {self.size} (the number of "
                f"elements of `{self.name}`), got a tensor of shape {tuple(flat.shape)}."
            )
        if len(self.sizes) == 1:
            leaves = [_cast(flat.reshape(self.shapes[0]), self.dtypes[0])]
        else:
            pieces = torch.split(flat, self.sizes)
            leaves = [_cast(p.reshape(s), d) for p, s, d in zip(pieces, self.shapes, self.dtypes)]
        return tree_unflatten(self.spec, leaves)

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.size, dtype=self.dtype, device=self.device)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def ravel_pytree(tree: TensorTree, /) -> tuple[torch.Tensor, Callable[[torch.Tensor], TensorTree]]:
    """Flatten a pytree of tensors into one 1-D tensor and return the inverse.

    Args:
        tree: a pytree whose leaves are tensors (promoted to a common dtype when raveled).

    Returns:
        ``(flat, unravel)``: ``flat`` is the concatenation of the raveled leaves and
        ``unravel(flat)`` rebuilds a tree of the same structure, shapes and dtypes from a
        1-D tensor of the same length (``ValueError`` for any other length).

    Raises:
        TypeError: a leaf of ``tree`` is not a tensor.

    Example:
        >>> import torch, functx
        >>> flat, unravel = functx.ravel_pytree({"w": torch.ones(2, 2), "b": torch.zeros(3)})
        >>> flat.shape
        torch.Size([7])
        >>> unravel(flat)["w"].shape
        torch.Size([2, 2])
    """
    leaves, spec = tree_flatten(tree)
    layout = FlatLayout(leaves, spec)
    return layout.ravel_leaves(leaves), layout.unravel


# --------------------------------------------------------------------------------------
# Tree algebra (public).


def _pair(x: TensorTree, y: TensorTree, api: str) -> tuple[list[torch.Tensor], list[torch.Tensor], TreeSpec]:
    xs, spec = tree_flatten(x)
    check_float_leaves(xs, lambda: leaf_paths(x, "x"), api=api, hint="")
    ys = flatten_like(y, spec, xs, name="y", api=api, ref="`x`")
    return xs, ys, spec


def _leaves(x: TensorTree, api: str) -> tuple[list[torch.Tensor], TreeSpec]:
    return flatten_float(x, name="x", api=api, hint="")


def _check_scalar(alpha: Any, api: str) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, complex, torch.Tensor)):
        raise TypeError(f"`functx.{api}`: `alpha` must be a number or a tensor, got {describe(alpha)}.")


def tree_vdot(x: TensorTree, y: TensorTree, /) -> torch.Tensor:
    """Inner product ``sum(conj(x) * y)`` over all leaves, as a 0-d tensor.

    Like :func:`torch.vdot`, the first argument is conjugated (a no-op for real trees).

    Args:
        x: a pytree of floating-point or complex tensors.
        y: a pytree with the structure, shapes and dtypes of ``x``.

    Returns:
        A 0-d tensor (``tensor(0.)`` for trees without leaves).

    Example:
        >>> import torch, functx
        >>> x = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor(3.0)}
        >>> functx.tree_vdot(x, x)
        tensor(14.)
    """
    xs, ys, _ = _pair(x, y, "tree_vdot")
    terms = [torch.vdot(a.reshape(-1), b.reshape(-1)) for a, b in zip(xs, ys)]
    if not terms:
        return torch.zeros(())
    return functools.reduce(torch.add, terms)


def tree_norm(x: TensorTree, /) -> torch.Tensor:
    """Euclidean (2-) norm of all the leaves of ``x`` taken together, as a real 0-d tensor.

    Scaled by the largest magnitude, as LAPACK's ``nrm2`` does: no overflow for entries
    near the top of the floating-point range and no underflow for tiny ones. It is
    differentiable and works under :func:`functx.vmap` and ``torch.compile``.

    Args:
        x: a pytree of floating-point or complex tensors.

    Returns:
        A real 0-d tensor (``tensor(0.)`` for a tree without leaves).

    Example:
        >>> import torch, functx
        >>> functx.tree_norm({"a": torch.tensor([3.0]), "b": torch.tensor(4.0)})
        tensor(5.)
    """
    xs, _ = _leaves(x, "tree_norm")
    if not xs:
        return torch.zeros(())
    return _scaled_norm(xs)


def _scaled_norm(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sqrt(sum |x_i|^2)`` computed as ``s * ||x / s||`` with ``s`` the largest magnitude (as
    LAPACK's ``nrm2`` and ``scipy.linalg.norm`` do): no overflow for entries near the top of
    the range, no underflow to zero for tiny ones. ``s`` is a constant for autograd (the
    identity holds for every ``s > 0``), and no branch depends on values (vmap, compile)."""
    real = [a.real.dtype if a.is_complex() else a.dtype for a in xs]
    dtype = functools.reduce(torch.promote_types, real)
    peaks = [a.detach().abs().amax().to(dtype) for a in xs if a.numel()]
    if not peaks:
        return torch.zeros((), dtype=dtype, device=xs[0].device)
    peak = peaks[0] if len(peaks) == 1 else torch.stack(peaks).amax()
    scale = torch.where((peak > 0) & torch.isfinite(peak), peak, torch.ones_like(peak))
    if len(xs) == 1:
        return torch.linalg.vector_norm(xs[0] / scale) * scale
    norms = torch.stack([torch.linalg.vector_norm(a / scale).to(dtype) for a in xs])
    return torch.linalg.vector_norm(norms) * scale


def tree_add(x: TensorTree, y: TensorTree, /) -> TensorTree:
    """Leafwise ``x + y``.

    Args:
        x: a pytree of floating-point or complex tensors.
        y: a pytree with the structure, shapes and dtypes of ``x``.

    Returns:
        A pytree with the structure of ``x``.

    Example:
        >>> import torch, functx
        >>> functx.tree_add({"a": torch.tensor(1.0)}, {"a": torch.tensor(2.0)})
        {'a': tensor(3.)}
    """
    xs, ys, spec = _pair(x, y, "tree_add")
    return tree_unflatten(spec, [a + b for a, b in zip(xs, ys)])


def tree_sub(x: TensorTree, y: TensorTree, /) -> TensorTree:
    """Leafwise ``x - y``.

    Args:
        x: a pytree of floating-point or complex tensors.
        y: a pytree with the structure, shapes and dtypes of ``x``.

    Returns:
        A pytree with the structure of ``x``.

    Example:
        >>> import torch, functx
        >>> functx.tree_sub((torch.tensor(1.0),), (torch.tensor(2.0),))
        (tensor(-1.),)
    """
    xs, ys, spec = _pair(x, y, "tree_sub")
    return tree_unflatten(spec, [a - b for a, b in zip(xs, ys)])


def tree_scale(alpha: float | complex | torch.Tensor, x: TensorTree, /) -> TensorTree:
    """Leafwise ``alpha * x``.

    Args:
        alpha: a number or a tensor broadcastable against every leaf (usually 0-d).
        x: a pytree of floating-point or complex tensors.

    Returns:
        A pytree with the structure of ``x``.

    Example:
        >>> import torch, functx
        >>> functx.tree_scale(2.0, [torch.tensor(1.0), torch.tensor([1.0, 2.0])])
        [tensor(2.), tensor([2., 4.])]
    """
    _check_scalar(alpha, "tree_scale")
    xs, spec = _leaves(x, "tree_scale")
    return tree_unflatten(spec, [alpha * a for a in xs])


def tree_axpy(alpha: float | complex | torch.Tensor, x: TensorTree, y: TensorTree, /) -> TensorTree:
    """Leafwise ``alpha * x + y``.

    Args:
        alpha: a number or a tensor broadcastable against every leaf (usually 0-d).
        x: a pytree of floating-point or complex tensors.
        y: a pytree with the structure, shapes and dtypes of ``x``.

    Returns:
        A pytree with the structure of ``x``.

    Example:
        >>> import torch, functx
        >>> functx.tree_axpy(2.0, {"a": torch.tensor(1.0)}, {"a": torch.tensor(10.0)})
        {'a': tensor(12.)}
    """
    _check_scalar(alpha, "tree_axpy")
    xs, ys, spec = _pair(x, y, "tree_axpy")
    return tree_unflatten(spec, [alpha * a + b for a, b in zip(xs, ys)])


def tree_zeros_like(x: TensorTree, /) -> TensorTree:
    """A pytree of zeros with the structure, shapes, dtypes and devices of ``x``.

    Args:
        x: a pytree of tensors.

    Returns:
        A pytree with the structure of ``x``.

    Example:
        >>> import torch, functx
        >>> functx.tree_zeros_like({"a": torch.ones(2)})
        {'a': tensor([0., 0.])}
    """
    leaves, spec = tree_flatten(x)
    FlatLayout(leaves, spec, name="x", api="tree_zeros_like")  # every leaf a tensor
    return tree_unflatten(spec, [torch.zeros_like(a) for a in leaves])
