"""``vmap``: ``torch.vmap`` semantics over optree pytrees.

Arguments are flattened with optree (so dataclasses registered with optree, namedtuples and
``None`` subtrees work like dicts), ``in_dims`` is broadcast as a tree prefix over them and
only the batched tensor leaves are handed to ``torch.vmap``; unbatched leaves are closed
over. Outputs are returned to ``torch.vmap`` as two groups, batched (``out_dims=0``) and
unbatched (``out_dims=None``), then moved to the requested dimensions and rebuilt.
Non-tensor outputs (ints, strings, ...) come back as they are: ``func`` runs once per
batch, so they are the same for every sample.

What depends only on the structure of the arguments (the leaves ``in_dims`` maps, after
broadcasting it) is computed once per structure and cached, as is the broadcast of
``out_dims`` over each output structure. In eager mode without ``chunk_size`` the level is
opened directly (``_torch_internals.vmap_enter``), which is what ``torch.vmap`` does under
its own pytree handling; elsewhere ``torch.vmap`` runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import torch

from . import _torch_internals as internals
from ._core import check_callable, check_choice, check_chunk_size
from ._tree import TreeSpec, broadcast_prefix, describe, leaf_paths, tree_flatten, tree_unflatten

RANDOMNESS = ("error", "different", "same")
Randomness = Literal["error", "different", "same"]

# What depends only on (in_dims, argument structure) or (out_dims, output structure), kept
# across calls and across vmap objects (a vmap built inside a loop hits it too). Only
# in_dims/out_dims made of ints and None are keys; other prefixes are recomputed each call.
_IN_PLANS: dict[tuple[Any, TreeSpec], tuple[list[Any], list[int]]] = {}
_OUT_DIMS: dict[tuple[Any, TreeSpec], list[Any]] = {}
_CACHE_LIMIT = 1024
_UNCACHED = object()


def _plain_dims(dims: Any) -> bool:
    """``dims`` is an int, None, or a flat tuple of them (no bools): hashable, and equal
    keys mean equal dims."""
    if dims is None or type(dims) is int:
        return True
    return type(dims) is tuple and all(d is None or type(d) is int for d in dims)


def _recall(cache: dict[Any, Any], key: Any) -> Any:
    # not while compiling: Dynamo cannot hash a spec (nor replay a store into the cache)
    if key[0] is _UNCACHED or torch.compiler.is_compiling():
        return None
    return cache.get(key)


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    if key[0] is not _UNCACHED and not torch.compiler.is_compiling():
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        cache[key] = value


def vmap(
    func: Callable[..., Any],
    in_dims: Any = 0,
    out_dims: Any = 0,
    randomness: Randomness = "error",
    *,
    chunk_size: int | None = None,
) -> Callable[..., Any]:
    """Vectorize ``func`` over a batch dimension of its inputs (``torch.vmap`` on pytrees).

    Args:
        func: the function to vectorize. Positional arguments may be any pytrees; keyword
            arguments are passed unbatched (as in ``torch.vmap``).
        in_dims: an int, ``None``, or a tuple with one entry per positional argument; each
            entry is a tree prefix of its argument whose leaves are ints (the batch
            dimension, negative counts from the end) or ``None`` (not batched).
            (default: ``0``)
        out_dims: the same for the output: an int, ``None`` or a tree prefix of the output.
            (default: ``0``)
        randomness: ``"error"``, ``"different"`` or ``"same"``, as in ``torch.vmap``.
            (default: ``"error"``)
        chunk_size: process the batch this many samples at a time, bounding memory.
            (default: ``None``)

    Returns:
        The vectorized function.

    Example:
        >>> import torch, functx, optree
        >>> @optree.dataclasses.dataclass(namespace="functx")
        ... class Linear:
        ...     w: torch.Tensor
        ...     b: torch.Tensor
        >>> f = lambda p, x: x @ p.w + p.b
        >>> p = Linear(w=torch.ones(3, 2), b=torch.zeros(2))
        >>> functx.vmap(f, in_dims=(None, 0))(p, torch.ones(5, 3)).shape
        torch.Size([5, 2])
        >>> ensemble = Linear(w=torch.ones(4, 3, 2), b=torch.zeros(4, 2))
        >>> functx.vmap(f, in_dims=(0, None))(ensemble, torch.ones(3)).shape
        torch.Size([4, 2])
    """
    check_callable(func, "func", "vmap")
    check_choice(randomness, "randomness", RANDOMNESS, "vmap")
    chunk_size = check_chunk_size(chunk_size, "vmap")
    _check_dims_tree(in_dims, "in_dims")
    _check_dims_tree(out_dims, "out_dims")

    in_key = in_dims if _plain_dims(in_dims) else _UNCACHED
    out_key = out_dims if _plain_dims(out_dims) else _UNCACHED

    def vmapped(*args: Any, **kwargs: Any) -> Any:
        leaves, spec = tree_flatten(args)
        plan = _recall(_IN_PLANS, (in_key, spec))
        if plan is None:  # a new structure: broadcast and check in_dims once
            dims = _leaf_in_dims(in_dims, args)
            plan = (dims, [k for k, d in enumerate(dims) if d is not None])
            _check_batched_dims(plan[0], plan[1])
            _remember(_IN_PLANS, (in_key, spec), plan)
        dims, batched = plan
        batch_size = _batch_size(args, leaves, dims, batched)
        outputs: dict[str, Any] = {}

        def out_dims_of(out: Any, out_leaves: list[Any], out_spec: TreeSpec) -> list[Any]:
            found = _recall(_OUT_DIMS, (out_key, out_spec))
            if found is None:  # a new output structure: broadcast out_dims once
                found = broadcast_prefix(out_dims, out, "the output", "out_dims", "vmap")
                _remember(_OUT_DIMS, (out_key, out_spec), found)
            _check_out_dims(out, out_leaves, found)
            return found

        if chunk_size is None and internals.flat_ok():
            return _vmap_flat(func, args, kwargs, leaves, spec, plan, batch_size, randomness, out_dims_of)

        def flat_fn(*batched_leaves: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            full = list(leaves)
            for k, leaf in zip(batched, batched_leaves):
                full[k] = leaf
            out = func(*tree_unflatten(spec, full), **kwargs)
            out_leaves, outputs["spec"] = tree_flatten(out)
            outputs["dims"] = out_dims_of(out, out_leaves, outputs["spec"])
            outputs["leaves"] = out_leaves
            tensors = [(t, d) for t, d in zip(out_leaves, outputs["dims"]) if isinstance(t, torch.Tensor)]
            return [t for t, d in tensors if d is not None], [t for t, d in tensors if d is None]

        mapped, unmapped = torch.vmap(
            flat_fn,
            in_dims=tuple(dims[k] for k in batched),
            out_dims=(0, None),  # type: ignore[arg-type]  # torch's annotation omits None entries
            randomness=randomness,
            chunk_size=chunk_size,
        )(*(leaves[k] for k in batched))
        return _rebuild(outputs, iter(mapped), iter(unmapped))

    return functools.update_wrapper(vmapped, func)


def _vmap_flat(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    leaves: list[Any],
    spec: TreeSpec,
    plan: tuple[list[Any], list[int]],
    batch_size: int,
    randomness: str,
    out_dims_of: Callable[[Any, list[Any], TreeSpec], list[Any]],
) -> Any:
    """``torch.vmap``'s eager implementation on the flat leaves: open a level, batch the
    mapped leaves, run ``func``, take the batch dimension out of every tensor output."""
    dims, batched = plan
    level = internals.vmap_enter(batch_size, randomness)
    try:
        full = list(leaves)
        for k in batched:
            leaf, dim = leaves[k], dims[k]
            full[k] = internals.add_batch_dim(leaf, dim + leaf.dim() if dim < 0 else dim, level)
        out = func(*tree_unflatten(spec, full), **kwargs)
        out_leaves, out_spec = tree_flatten(out)
        rebuilt = []
        for k, (leaf, dim) in enumerate(zip(out_leaves, out_dims_of(out, out_leaves, out_spec))):
            if not isinstance(leaf, torch.Tensor):
                rebuilt.append(leaf)
            elif dim is None:
                if internals.is_batched(leaf):
                    raise ValueError(
                        f"`functx.vmap`: `out_dims` is None for {leaf_paths(out, 'output')[k]}, but it varies "
                        f"along a mapped dimension; give it an int in `out_dims`."
                    )
                rebuilt.append(leaf)
            else:
                t = internals.remove_batch_dim(leaf, level, batch_size, 0)
                rebuilt.append(t if dim == 0 else t.movedim(0, dim))
    finally:
        internals.vmap_exit()
    return tree_unflatten(out_spec, rebuilt)


def _rebuild(outputs: dict[str, Any], mapped: Any, unmapped: Any) -> Any:
    rebuilt = []
    for leaf, dim in zip(outputs["leaves"], outputs["dims"]):
        if not isinstance(leaf, torch.Tensor):
            rebuilt.append(leaf)
        elif dim is None:
            rebuilt.append(next(unmapped))
        else:
            _check_dim(dim, "out_dims")
            t = next(mapped)
            rebuilt.append(t if dim == 0 else t.movedim(0, dim))
    return tree_unflatten(outputs["spec"], rebuilt)


def _check_out_dims(out: Any, leaves: list[Any], dims: list[Any]) -> None:
    """Every ``out_dims`` entry must be an int that exists in the batched output (checked
    while ``func``'s outputs are traced, before torch moves any dimension)."""
    for k, (leaf, dim) in enumerate(zip(leaves, dims)):
        if dim is None or not isinstance(leaf, torch.Tensor):
            continue
        _check_dim(dim, "out_dims")
        rank = leaf.dim() + 1  # with the batch dimension
        if not -rank <= dim < rank:
            raise ValueError(
                f"`functx.vmap`: `out_dims` puts the batch dimension of {leaf_paths(out, 'output')[k]} at "
                f"{dim}, but with the batch dimension it has {rank} dimension(s) (valid: {-rank} to {rank - 1})."
            )


def _check_dims_tree(dims: Any, name: str) -> None:
    if dims is None or (isinstance(dims, int) and not isinstance(dims, bool)):
        return
    if name == "in_dims" and not isinstance(dims, tuple):
        raise TypeError(
            f"`functx.vmap`: `in_dims` must be an int, None, or a tuple with one entry per "
            f"positional argument, got {describe(dims)}."
        )


def _check_dim(dim: Any, name: str) -> None:
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"`functx.vmap`: the leaves of `{name}` must be ints or None, got {dim!r}.")


def _leaf_in_dims(in_dims: Any, args: tuple[Any, ...]) -> list[Any]:
    if isinstance(in_dims, tuple) and len(in_dims) != len(args):
        raise ValueError(
            f"`functx.vmap`: `in_dims` has {len(in_dims)} entries but the function was called "
            f"with {len(args)} positional argument(s)."
        )
    return broadcast_prefix(in_dims, args, "the positional arguments", "in_dims", "vmap")


def _check_batched_dims(dims: list[Any], batched: list[int]) -> None:
    """The structural checks of ``in_dims`` (once per argument structure)."""
    if not batched:
        raise ValueError(
            "`functx.vmap`: at least one tensor argument must be batched (have an int in "
            "`in_dims`); got no batched inputs."
        )
    for k in batched:
        _check_dim(dims[k], "in_dims")


def _batch_size(args: tuple[Any, ...], leaves: list[Any], dims: list[Any], batched: list[int]) -> int:
    """The common size of the mapped dimensions (the per-call checks: types, ranks, sizes)."""
    sizes: dict[int, int] = {}  # batch size -> index of the first leaf with it (paths only on error)
    for k in batched:
        leaf, dim = leaves[k], dims[k]
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"`functx.vmap`: {leaf_paths(args, 'args')[k]} is {describe(leaf)} but `in_dims` maps it over "
                f"dimension {dim}; give it `None` in `in_dims`."
            )
        ndim = leaf.dim()
        if not -ndim <= dim < ndim:
            raise ValueError(
                f"`functx.vmap`: {leaf_paths(args, 'args')[k]} has shape {tuple(leaf.shape)}, which has no "
                f"dimension {dim} to map over (in_dims={dim})."
            )
        sizes.setdefault(leaf.shape[dim], k)
    if len(sizes) > 1:
        paths = leaf_paths(args, "args")
        found = ", ".join(f"{paths[k]} has size {s}" for s, k in sizes.items())
        raise ValueError(f"`functx.vmap`: inconsistent batch sizes along the mapped dimensions: {found}.")
    return next(iter(sizes))
