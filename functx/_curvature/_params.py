"""The parameter side of an operator: the model as a pure function of the selected parameters,
and the flattening of those parameters into one vector of length ``P``.

Flattening order: for a dict of tensors (always the case for an ``nn.Module``), the dict's key
order, each tensor raveled in row-major (C) order; for any other pytree (callable models),
functx's pytree leaf order (optree, dict keys sorted).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .._tree import flatten_like, leaf_paths, tree_flatten, tree_unflatten
from ..nn import make_functional


class Layout:
    """How a parameter tree maps to a flat vector (and back).

    Args:
        params: a dict name -> tensor, or any pytree of tensors.
        api: the public name used in error messages.
    """

    def __init__(self, params: Any, api: str) -> None:
        self.api = api
        if isinstance(params, dict) and all(isinstance(t, torch.Tensor) for t in params.values()):
            self.keys: list[str] | None = list(params)
            leaves, self.treespec = list(params.values()), tree_flatten({})[1]  # treespec unused for a dict
            self.paths = [f"params[{k!r}]" for k in self.keys]
        else:
            self.keys = None
            leaves, self.treespec = tree_flatten(params)
            self.paths = leaf_paths(params, "params")
        for path, leaf in zip(self.paths, leaves):
            if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
                kind = f"a {leaf.dtype} tensor" if isinstance(leaf, torch.Tensor) else type(leaf).__name__
                raise TypeError(f"`{api}`: {path} must be a floating-point tensor, got {kind}.")
        if not leaves:
            raise ValueError(f"`{api}`: `params` holds no tensor; select at least one parameter.")
        self.leaves = [leaf.detach() for leaf in leaves]
        self.shapes = [tuple(leaf.shape) for leaf in self.leaves]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.size = sum(self.sizes)
        self._check_uniform()

    def _check_uniform(self) -> None:
        dtypes = {leaf.dtype for leaf in self.leaves}
        devices = {leaf.device for leaf in self.leaves}
        if len(dtypes) > 1 or len(devices) > 1:
            found = sorted({f"{t.dtype} on {t.device}" for t in self.leaves})
            raise ValueError(
                f"`{self.api}`: every tensor of `params` must have one dtype and device (the operator acts on "
                f"one flat vector), got {', '.join(found)}."
            )
        self.dtype, self.device = dtypes.pop(), devices.pop()

    def signature(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """``(path, shape, dtype)`` of every leaf, in flattening order."""
        return [(path, shape, self.dtype) for path, shape in zip(self.paths, self.shapes)]

    def to_tree(self, leaves: list[torch.Tensor]) -> Any:
        """The pytree shaped like ``params`` holding ``leaves``."""
        if self.keys is not None:
            return dict(zip(self.keys, leaves))
        return tree_unflatten(self.treespec, leaves)

    def tree_leaves(self, tree: Any, what: str) -> list[torch.Tensor]:
        """The leaves of ``tree``, which must have the structure of ``params``."""
        if self.keys is not None:
            if not isinstance(tree, Mapping) or set(tree) != set(self.keys):
                got = sorted(map(str, tree)) if isinstance(tree, Mapping) else type(tree).__name__
                raise ValueError(
                    f"`{self.api}`: `{what}` must be a dict with the keys of params {self.keys}, got {got}."
                )
            return [tree[k] for k in self.keys]
        api = self.api.removeprefix("functx.")  # flatten_like adds the prefix
        return flatten_like(tree, self.treespec, [None] * len(self.shapes), name=what, api=api, ref="`params`")

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Cut a ``(K, P)`` tensor into ``(K, *shape)`` pieces, one per leaf."""
        pieces = flat.split(self.sizes, dim=1)
        return [p.reshape(flat.shape[0], *s) for p, s in zip(pieces, self.shapes)]


def model_function(model: Any, layout: Layout, api: str) -> tuple[Callable[..., Any], Callable[..., Any] | None]:
    """``(forward, stateful)``: ``forward(params_tree, X) -> prediction`` and, for a module,
    ``stateful(params_tree, X) -> (prediction, buffers_changed)`` (None for a callable)."""
    if isinstance(model, nn.Module):
        return _module_function(model, layout, api)
    if not callable(model):
        raise TypeError(
            f"`{api}`: `model` must be a torch.nn.Module or a callable model(params, X) -> prediction, "
            f"got a value of type {type(model).__name__}."
        )
    return model, None


def _module_function(module: nn.Module, layout: Layout, api: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    fmodel, all_params, buffers = make_functional(module)
    if layout.keys is None:
        raise TypeError(
            f"`{api}`: for an nn.Module, `params` must be a dict name -> tensor (a subset of named_parameters())."
        )
    for key, shape in zip(layout.keys, layout.shapes):
        if key not in all_params:
            raise ValueError(
                f"`{api}`: params[{key!r}] is not a parameter of the model; its parameters are {list(all_params)}."
            )
        if tuple(all_params[key].shape) != shape:
            raise ValueError(
                f"`{api}`: params[{key!r}] must have the shape of the model's parameter, "
                f"{tuple(all_params[key].shape)}, got {shape}."
            )
    fixed = {name: t for name, t in all_params.items() if name not in set(layout.keys)}

    def forward(params: dict[str, torch.Tensor], X: Any) -> Any:
        return fmodel({**fixed, **params}, buffers, X)

    def stateful(params: dict[str, torch.Tensor], X: Any) -> tuple[Any, bool]:
        out, new = fmodel.stateful({**fixed, **params}, buffers, X)
        return out, any(not torch.equal(new[name], buffers[name]) for name in buffers)

    return forward, stateful
