"""The parameter side of an operator: the model as a pure function of the selected parameters,
and the flattening of those parameters into one vector of length ``P``.

Flattening order: for a dict of tensors (always the case for an ``nn.Module``), the dict's key
order, each tensor raveled in row-major (C) order; for any other pytree (callable models),
functx's pytree leaf order (optree, dict keys sorted).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._tree import FlatLayout, flatten_like, leaf_paths, tree_flatten, tree_unflatten
from .._validate import describe, fail
from ..nn import make_functional


class Layout:
    """How a parameter tree maps to a flat vector (and back): a thin wrapper of the core's
    :class:`functx._tree.FlatLayout` that fixes the leaf order.

    The order is explicit: for a dict of tensors, its keys in insertion order (``keys``; the
    flat layout is then built over the list of values, since optree would sort the keys); for
    any other pytree, the pytree's leaf order (``keys`` is ``None``).

    A list or tuple of an ``nn.Module``'s own parameters (curvlinops' convention, e.g.
    ``[p for p in model.parameters() if p.requires_grad]``) is accepted too: each is named by
    identity, the order is the list's, and trees given to or returned by the operator are lists
    (or tuples) in that order.

    Args:
        params: a dict name -> tensor, or any pytree of tensors.
        api: the public name used in error messages.
        keys: the key order of a dict ``params`` (default: ``None``, its insertion order).
        model: the model (an ``nn.Module`` names a list of its own parameters).
    """

    def __init__(self, params: Any, api: str, keys: Sequence[str] | None = None, model: Any = None) -> None:
        self.api = api
        self.sequence: type | None = None  # list/tuple: the form of the user's trees
        if isinstance(model, nn.Module) and isinstance(params, (list, tuple)) and params:
            self.sequence = type(params)
            params = _named(model, params, api)
        if isinstance(params, dict) and all(isinstance(t, torch.Tensor) for t in params.values()):
            self.keys: list[str] | None = list(params) if keys is None else list(keys)
            if set(self.keys) != set(params) or len(self.keys) != len(params):
                raise fail(api, f"`keys` must order the keys of `params` {list(params)}, got {self.keys}.")
            leaves = [params[k] for k in self.keys]
            self.treespec = tree_flatten(leaves)[1]  # a list: the explicit order
            self.paths = [f"params[{k!r}]" for k in self.keys]
        else:
            self.keys = None
            leaves, self.treespec = tree_flatten(params)
            self.paths = leaf_paths(params, "params")
        for path, leaf in zip(self.paths, leaves):
            if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
                raise fail(api, f"{path} must be a floating-point tensor, got {describe(leaf)}.", TypeError)
            if leaf.is_inference():
                raise fail(
                    api,
                    f"{path} must be a normal tensor, got an inference tensor (created under "
                    f"torch.inference_mode(), it cannot be differentiated): build the model outside inference mode.",
                )
        if not leaves:
            raise fail(api, "`params` must hold at least one tensor, got none; select at least one parameter.")
        self.leaves = [leaf.detach() for leaf in leaves]
        self.flat = FlatLayout(self.leaves, self.treespec, name="params", api=api.removeprefix("functx."))
        self.shapes = [tuple(shape) for shape in self.flat.shapes]
        self.sizes = list(self.flat.sizes)
        self.size = self.flat.size
        self._check_uniform()

    def _check_uniform(self) -> None:
        if not self.flat.uniform or len({leaf.device for leaf in self.leaves}) > 1:
            found = sorted({f"{t.dtype} on {t.device}" for t in self.leaves})
            raise fail(
                self.api,
                f"every tensor of `params` must have one dtype and device (the operator acts on one flat vector), "
                f"got {', '.join(found)}.",
            )
        self.dtype, self.device = self.flat.dtype, self.flat.device

    def signature(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """``(path, shape, dtype)`` of every leaf, in flattening order."""
        return [(path, shape, self.dtype) for path, shape in zip(self.paths, self.shapes)]

    def ravel(self, leaves: Sequence[torch.Tensor]) -> torch.Tensor:
        """The ``(P,)`` concatenation of ``leaves`` (shaped like the parameters, in order)."""
        return self.flat.ravel_leaves(leaves)

    def to_tree(self, leaves: list[torch.Tensor]) -> Any:
        """The pytree the model takes (a dict name -> tensor for an ``nn.Module``) holding ``leaves``."""
        if self.keys is not None:
            return dict(zip(self.keys, leaves))
        return tree_unflatten(self.treespec, leaves)

    def to_user(self, leaves: list[torch.Tensor]) -> Any:
        """The pytree shaped like the ``params`` the user gave, holding ``leaves``."""
        return self.sequence(leaves) if self.sequence is not None else self.to_tree(leaves)

    def tree_leaves(self, tree: Any, what: str) -> list[torch.Tensor]:
        """The leaves of ``tree``, which must have the structure of ``params``."""
        if self.sequence is not None and isinstance(tree, (list, tuple)):
            if len(tree) != len(self.shapes):
                raise fail(
                    self.api,
                    f"`{what}` must be a list with one tensor per parameter of `params` ({len(self.shapes)}), "
                    f"got a {type(tree).__name__} of length {len(tree)}.",
                )
            return list(tree)
        if self.keys is not None:
            if not isinstance(tree, Mapping) or set(tree) != set(self.keys):
                got = sorted(map(str, tree)) if isinstance(tree, Mapping) else describe(tree)
                raise fail(self.api, f"`{what}` must be a dict with the keys of params {self.keys}, got {got}.")
            return [tree[k] for k in self.keys]
        api = self.api.removeprefix("functx.")  # flatten_like adds the prefix
        return flatten_like(tree, self.treespec, [None] * len(self.shapes), name=what, api=api, ref="`params`")

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Cut a ``(K, P)`` tensor into ``(K, *shape)`` pieces, one per leaf."""
        pieces = flat.split(self.sizes, dim=1)
        return [p.reshape(flat.shape[0], *s) for p, s in zip(pieces, self.shapes)]


def _named(module: nn.Module, params: Sequence[Any], api: str) -> dict[str, Any]:
    """A list of ``module``'s own parameters as a dict keyed by their names (by identity)."""
    names = {id(p): name for name, p in module.named_parameters()}
    named: dict[str, Any] = {}
    for k, p in enumerate(params):
        if not isinstance(p, torch.Tensor) or id(p) not in names:
            raise fail(
                api,
                f"params[{k}] must be one of the model's own parameters (a list of them is named by identity), got "
                f"{describe(p)} that is not in model.parameters(); pass a dict name -> tensor instead.",
                TypeError,
            )
        if names[id(p)] in named:
            raise fail(api, f"params[{k}] must appear once, got the parameter {names[id(p)]!r} twice.")
        named[names[id(p)]] = p
    return named


def model_function(model: Any, layout: Layout, api: str) -> tuple[Callable[..., Any], Callable[..., Any] | None]:
    """``(forward, stateful)``: ``forward(params_tree, X) -> prediction`` and, for a module,
    ``stateful(params_tree, X) -> (prediction, names of the buffers it changed)`` (None for a callable)."""
    if isinstance(model, nn.Module):
        return _module_function(model, layout, api)
    if not callable(model):
        raise fail(
            api,
            f"`model` must be a torch.nn.Module or a callable model(params, X) -> prediction, got {describe(model)}.",
            TypeError,
        )
    return model, None


def _module_function(module: nn.Module, layout: Layout, api: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    fmodel, all_params, buffers = make_functional(module)
    if layout.keys is None:
        raise fail(
            api,
            "`params` must be a dict name -> tensor (a subset of dict(model.named_parameters())) or a list of the "
            "model's own parameters for an nn.Module, got another pytree.",
            TypeError,
        )
    for key, shape in zip(layout.keys, layout.shapes):
        if key not in all_params:
            raise fail(
                api, f"params[{key!r}] must be a parameter of the model {list(all_params)}, got an unknown name."
            )
        if tuple(all_params[key].shape) != shape:
            raise fail(
                api,
                f"params[{key!r}] must have the shape of the model's parameter, {tuple(all_params[key].shape)}, got {shape}.",
            )
    fixed = {name: t for name, t in all_params.items() if name not in set(layout.keys)}

    def forward(params: dict[str, torch.Tensor], X: Any) -> Any:
        return fmodel({**fixed, **params}, buffers, X)

    def stateful(params: dict[str, torch.Tensor], X: Any) -> tuple[Any, list[str]]:
        out, new = fmodel.stateful({**fixed, **params}, buffers, X)
        return out, [name for name in buffers if not torch.equal(new[name], buffers[name])]

    return forward, stateful
