"""``vmap``: ``torch.vmap`` semantics over optree pytrees.

Arguments are flattened with optree (so dataclasses registered with optree, namedtuples and
``None`` subtrees work like dicts), ``in_dims`` is broadcast as a tree prefix over them and
only the batched tensor leaves are handed to ``torch.vmap``; unbatched leaves are closed
over. Outputs are returned to ``torch.vmap`` as two groups, batched (``out_dims=0``) and
unbatched (``out_dims=None``), then moved to the requested dimensions and rebuilt.
Non-tensor outputs (ints, strings, ...) come back as they are: ``func`` runs once per
batch, so they are the same for every sample.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from ._core import check_callable, check_choice, check_chunk_size
from ._tree import broadcast_prefix, describe, leaf_paths, tree_flatten, tree_unflatten

RANDOMNESS = ("error", "different", "same")


def vmap(
    func: Callable[..., Any],
    in_dims: Any = 0,
    out_dims: Any = 0,
    randomness: str = "error",
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

    @functools.wraps(func)
    def vmapped(*args: Any, **kwargs: Any) -> Any:
        leaves, spec = tree_flatten(args)
        dims = _leaf_in_dims(in_dims, args)
        batched = [k for k, d in enumerate(dims) if d is not None]
        _check_batched_leaves(args, leaves, dims, batched)
        outputs: dict[str, Any] = {}

        def flat_fn(*batched_leaves: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            full = list(leaves)
            for k, leaf in zip(batched, batched_leaves):
                full[k] = leaf
            out = func(*tree_unflatten(spec, full), **kwargs)
            out_leaves, outputs["spec"] = tree_flatten(out)
            outputs["dims"] = broadcast_prefix(out_dims, out, "the output", "out_dims", "vmap")
            outputs["leaves"] = out_leaves
            _check_out_dims(out, out_leaves, outputs["dims"])
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

    return vmapped


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


def _check_batched_leaves(args: tuple[Any, ...], leaves: list[Any], dims: list[Any], batched: list[int]) -> None:
    if not batched:
        raise ValueError(
            "`functx.vmap`: at least one tensor argument must be batched (have an int in "
            "`in_dims`); got no batched inputs."
        )
    sizes: dict[int, int] = {}  # batch size -> index of the first leaf with it (paths only on error)
    for k in batched:
        leaf, dim = leaves[k], dims[k]
        _check_dim(dim, "in_dims")
        path = lambda: leaf_paths(args, "args")[k]
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"`functx.vmap`: {path()} is {describe(leaf)} but `in_dims` maps it over dimension "
                f"{dim}; give it `None` in `in_dims`."
            )
        if not -leaf.dim() <= dim < max(leaf.dim(), 1) or leaf.dim() == 0:
            raise ValueError(
                f"`functx.vmap`: {path()} has shape {tuple(leaf.shape)}, which has no dimension {dim} "
                f"to map over (in_dims={dim})."
            )
        sizes.setdefault(leaf.shape[dim], k)
    if len(sizes) > 1:
        paths = leaf_paths(args, "args")
        found = ", ".join(f"{paths[k]} has size {s}" for s, k in sizes.items())
        raise ValueError(f"`functx.vmap`: inconsistent batch sizes along the mapped dimensions: {found}.")
