"""The module tree analysed once, and the check that it did not change since.

:func:`functx.nn.make_functional` builds a :class:`Plan`: one :class:`Node` per distinct
submodule, holding for each of its ``_parameters``/``_buffers``/``_modules`` entries the
index of the tensor group (tied tensors form one group) or of the child node to put
there. Every call first checks that the module still has the structure the plan was made
from (:func:`check_fresh`), so a call never runs stale code or shapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._convert import Fix, check_convertible, fixes

TensorDict = dict[str, torch.Tensor]

OWN = ("_parameters", "_buffers", "_modules")
_NOUNS = ("parameter", "buffer", "submodule")
Slots = tuple[tuple[str, "int | None"], ...]


class Node:
    """One distinct submodule: where each entry of its three dicts comes from, and a
    snapshot of those dicts (entries and tensor shapes) to detect later changes."""

    __slots__ = (
        "buffers",
        "children",
        "cls",
        "fixes",
        "keys",
        "module",
        "norm",
        "params",
        "path",
        "rnn",
        "shapes",
        "values",
    )

    def __init__(self, module: nn.Module, path: str) -> None:
        self.module, self.cls, self.path = module, type(module), path
        self.params: Slots = ()
        self.buffers: Slots = ()
        self.children: Slots = ()
        d = module.__dict__
        self.keys = tuple(tuple(d[k]) for k in OWN)
        self.shapes = tuple(tuple(_shape(v) for v in d[k].values()) for k in OWN[:2])
        self.values = tuple(tuple(d[k].values()) for k in OWN)
        self.fixes: tuple[tuple[Fix, str, Any], ...] = ()
        self.rnn = isinstance(module, nn.RNNBase)
        self.norm = is_norm_with_running_stats(module)


def is_norm_with_running_stats(module: nn.Module) -> bool:
    """A normalization layer with running statistics (BatchNorm, InstanceNorm and
    SyncBatchNorm, torch's private ``_NormBase``, or a user layer following its
    convention), recognized by its public attributes rather than the private class."""
    d = module.__dict__
    return "running_mean" in d["_buffers"] and isinstance(d.get("track_running_stats"), bool)


def _shape(value: Any) -> torch.Size | None:
    return None if value is None else value.shape


class Group:
    """The tensors of one kind (parameters or buffers): canonical names and aliases."""

    def __init__(self, kind: str, named: Iterator[tuple[str, torch.Tensor]]) -> None:
        self.kind = kind  # "params" or "buffers", the argument's name
        self.noun = "parameter" if kind == "params" else "buffer"
        self.names: list[str] = []
        self.shapes: list[torch.Size] = []
        self.index: dict[int, int] = {}  # id(tensor) -> group, valid while the plan is built
        for name, tensor in named:
            self.index[id(tensor)] = len(self.names)
            self.names.append(name)
            self.shapes.append(tensor.shape)
        self.aliases: dict[str, int] = dict(zip(self.names, range(len(self.names))))
        self.keyset = frozenset(self.names)

    def slots(self, entries: dict[str, Any]) -> Slots:
        return tuple((k, None if v is None else self.index[id(v)]) for k, v in entries.items())


class Plan:
    """Everything a call needs that does not depend on the call."""

    def __init__(self, root: nn.Module, api: str) -> None:
        check_convertible(root, api)
        self.root, self.api = root, api
        self.params = Group("params", root.named_parameters())
        self.buffers = Group("buffers", root.named_buffers())
        self.nodes: list[Node] = []
        position: dict[int, int] = {}
        for path, module in root.named_modules():
            position[id(module)] = len(self.nodes)
            self.nodes.append(Node(module, path))
        for node in self.nodes:
            d = node.module.__dict__
            node.params = self.params.slots(d["_parameters"])
            node.buffers = self.buffers.slots(d["_buffers"])
            node.children = tuple((k, None if m is None else position[id(m)]) for k, m in d["_modules"].items())
        self.virtual: dict[str, str] = {}  # plain name of a parametrized tensor -> its originals
        for prefix, module in occurrences(root):
            self._add_aliases(prefix, module)
        tree = dict.fromkeys(position) | dict.fromkeys(self.params.index) | dict.fromkeys(self.buffers.index)
        for node in self.nodes:
            node.fixes = fixes(node.module, node.path, position, tree, api)
        self.parametrized = bool(self.virtual)
        self.params.index = self.buffers.index = {}  # ids of the tensors seen while building

    def _add_aliases(self, prefix: str, module: nn.Module) -> None:
        d = module.__dict__
        for group, entries in ((self.params, d["_parameters"]), (self.buffers, d["_buffers"])):
            for k, v in entries.items():
                if v is not None:
                    group.aliases.setdefault(prefix + k, group.index[id(v)])
        if parametrize.is_parametrized(module):
            parametrizations: Any = module.parametrizations
            for tensor_name, plist in parametrizations.items():
                originals = [f"{prefix}parametrizations.{tensor_name}.{k}" for k in plist._parameters]
                originals += [f"{prefix}parametrizations.{tensor_name}.{k}" for k in plist._buffers]
                self.virtual[prefix + tensor_name] = ", ".join(repr(o) for o in originals)


def occurrences(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every ``(prefix, module)`` path of the tree, a shared module once per path; a module
    is not entered again below itself (reference cycles through ``_modules``)."""
    stack: list[tuple[str, nn.Module, frozenset[int]]] = [("", root, frozenset())]
    while stack:
        prefix, module, ancestors = stack.pop()
        yield prefix, module
        inner = ancestors | {id(module)}
        children = [
            (prefix + k + ".", m, inner) for k, m in module._modules.items() if m is not None and id(m) not in inner
        ]
        stack.extend(reversed(children))


# --------------------------------------------------------------------------------------
# Has the module changed since the plan was made?


def check_fresh(plan: Plan, api: str) -> None:
    """Raise ``ValueError`` if the module's structure changed after conversion: a class
    swapped (a parametrization registered), an entry added or removed, a submodule
    replaced, or a tensor replaced by one of another shape. Cheap when nothing changed
    (one identity comparison per entry); a tensor replaced by one of the same shape (a
    buffer reassigned by the module's own forward, a parameter re-created) is no change,
    the call uses the given tensors anyway. A tensor re-seated in place with another shape
    (``p.data = ...``) is found when the given tensors' shapes disagree with the plan's
    (:func:`functx._nn._tensors.resolve`)."""
    for node in plan.nodes:
        if not _unchanged(node):
            raise_if_changed(plan, api)


def _unchanged(node: Node) -> bool:
    d = node.module.__dict__
    params, buffers, modules = node.values
    try:  # tuple equality compares identical entries by identity, without Tensor.__eq__
        return (
            type(node.module) is node.cls
            and tuple(d["_parameters"].values()) == params
            and tuple(d["_buffers"].values()) == buffers
            and tuple(d["_modules"].values()) == modules
        )
    except RuntimeError:  # an entry was replaced: Tensor.__eq__ is elementwise
        return False


def raise_if_changed(plan: Plan, api: str) -> None:
    """Raise the ``ValueError`` naming every change of the module since the plan."""
    changes = [c for node in plan.nodes for c in _changes(node)]
    if changes:
        shown = "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")
        raise ValueError(
            f"`functx.nn.{api}`: the module changed after `functx.nn.{plan.api}` converted it: {shown}. "
            f"A FunctionalModule holds the structure it was made from; call `functx.nn.{plan.api}` "
            f"again on the changed module."
        )


def _changes(node: Node) -> list[str]:
    where = f"submodule {node.path!r}" if node.path else "the root module"
    if type(node.module) is not node.cls:
        return [f"{where} is now a {type(node.module).__name__}, was a {node.cls.__name__}"]
    prefix = f"{node.path}." if node.path else ""
    out = []
    for i, (kind, noun) in enumerate(zip(OWN, _NOUNS)):
        now = node.module.__dict__[kind]
        was = dict(zip(node.keys[i], node.shapes[i] if i < 2 else node.values[2]))
        out += [f"{noun} {prefix + k!r} was added" for k in now if k not in was]
        out += [f"{noun} {prefix + k!r} was removed" for k in was if k not in now]
        for k in (k for k in now if k in was):
            out += _entry_change(noun, prefix + k, now[k], was[k])
    return out


def _entry_change(noun: str, name: str, value: Any, was: Any) -> list[str]:
    """``was`` is the submodule, or the tensor's shape (``None`` for an empty slot)."""
    if isinstance(value, nn.Module) or isinstance(was, nn.Module):
        same = value is was
        return [] if same else [f"{noun} {name!r} was replaced ({type(was).__name__} -> {type(value).__name__})"]
    now = _shape(value)
    if now == was:
        return []
    if now is None or was is None:
        return [f"{noun} {name!r} is {'now' if now is None else 'no longer'} None"]
    return [f"{noun} {name!r} has shape {tuple(now)}, was {tuple(was)}"]
