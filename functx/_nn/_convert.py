"""What cannot be converted, and what must be redirected per call.

A call runs ``forward`` on shallow copies of the modules of the tree. Attributes holding
a module of the tree outside ``_modules`` (or a method bound to one), and forward hooks
that are such bound methods, are redirected to the copies; any other reference to a
module, parameter or buffer of the tree (a closure, a ``functools.partial``, a list of
modules) cannot be redirected: an attribute raises at conversion, a hook warns.
"""

from __future__ import annotations

import enum
import functools
import types
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._validate import check_instance

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_SKIP_SCAN = frozenset(nn.Module().__dict__)  # torch's own bookkeeping: dicts, hooks, flags
_SCAN_DEPTH = 4


def check_convertible(root: nn.Module, api: str) -> None:
    check_instance(root, nn.Module, "module", f"nn.{api}", "a torch.nn.Module")
    for path, module in root.named_modules():
        where = f"submodule {path!r}" if path else "the module"
        if isinstance(module, torch.jit.ScriptModule):
            raise TypeError(
                f"`functx.nn.{api}`: {where} is a TorchScript module ({type(module).__name__}); its "
                f"compiled code reads its own parameters, so it cannot run with other tensors. "
                f"Convert the eager module, before `torch.jit.script`/`trace`."
            )
        if type(module).__name__ == "OptimizedModule" and "_orig_mod" in module._modules:
            raise TypeError(
                f"`functx.nn.{api}`: {where} is a `torch.compile`d module. Convert the original "
                f"(`{path + '.' if path else ''}_orig_mod`) and compile the function you build from it."
            )
        if module.__dict__.get("_compiled_call_impl") is not None:
            raise TypeError(
                f"`functx.nn.{api}`: {where} was compiled in place with `Module.compile()`, which calls "
                f"the original module. Convert an uncompiled module and compile the converted call."
            )
        for name, p in module._parameters.items():
            if p is not None and nn.parameter.is_lazy(p):
                raise ValueError(
                    f"`functx.nn.{api}`: parameter {path + '.' if path else ''}{name} of {where} is not "
                    f"initialized yet (a lazy module). Run one forward pass before converting."
                )


class Fix(enum.Enum):
    """How :func:`fixes` redirects an entry of a copy's ``__dict__`` to the copies."""

    MODULE = "an attribute holding a module of the tree; payload: its node"
    METHOD = "a method bound to a module of the tree; payload: (function, node)"
    HOOKS = "a hook dict with bound-method hooks; payload: {hook_id: (function, node)}"


def fixes(
    module: nn.Module, path: str, position: dict[int, int], tree: dict[int, None], api: str
) -> tuple[tuple[Fix, str, Any], ...]:
    """Per-call redirections of ``module``'s attributes and hooks to the copies.

    ``position`` maps ``id`` of each module of the tree to its node; ``tree`` holds the ids
    of its modules, parameters and buffers. Returns ``(fix, key, payload)`` triples."""
    return _attribute_fixes(module, path, position, tree, api) + _hook_fixes(module, path, position, tree, api)


def _attribute_fixes(
    module: nn.Module, path: str, position: dict[int, int], tree: dict[int, None], api: str
) -> tuple[tuple[Fix, str, Any], ...]:
    found: list[tuple[Fix, str, Any]] = []
    skip = _SKIP_SCAN | ({"_flat_weights"} if isinstance(module, nn.RNNBase) else set())
    for key, value in module.__dict__.items():
        if key in skip:
            continue
        if isinstance(value, nn.Module) and id(value) in position:
            found.append((Fix.MODULE, key, position[id(value)]))
        elif isinstance(value, types.MethodType) and id(value.__self__) in position:
            found.append((Fix.METHOD, key, (value.__func__, position[id(value.__self__)])))
        elif _refers(value, tree, _SCAN_DEPTH):
            raise ValueError(
                f"`functx.nn.{api}`: attribute {key!r} of {_where(path)} ({type(value).__name__}) refers "
                f"to a module, parameter or buffer of the tree outside `_modules`/`_parameters`/"
                f"`_buffers` (directly, or through a closure, a functools.partial or a container). The "
                f"converted call could not substitute the given tensors there and would silently use "
                f"the module's own. Register submodules with nn.ModuleList / nn.ModuleDict, tensors "
                f"with register_parameter / register_buffer, or store a bound method itself."
            )
    return tuple(found)


def _hook_fixes(
    module: nn.Module, path: str, position: dict[int, int], tree: dict[int, None], api: str
) -> tuple[tuple[Fix, str, Any], ...]:
    found: list[tuple[Fix, str, Any]] = []
    for key in _HOOK_DICTS:
        rebound = {}
        for hook_id, hook in module.__dict__.get(key, {}).items():
            if isinstance(hook, types.MethodType) and id(hook.__self__) in position:
                rebound[hook_id] = (hook.__func__, position[id(hook.__self__)])
            elif _refers(hook, tree, _SCAN_DEPTH):
                warnings.warn(
                    f"`functx.nn.{api}`: a hook in {key} of {_where(path)} refers to a module of the "
                    f"tree through a closure or partial; if it reads that module's parameters or "
                    f"buffers it sees the module's own tensors, not the ones passed to the call.",
                    UserWarning,
                    stacklevel=5,
                )
        if rebound:
            found.append((Fix.HOOKS, key, rebound))
    return tuple(found)


def _where(path: str) -> str:
    return f"submodule {path!r}" if path else "the root module"


def _refers(value: Any, tree: dict[int, None], depth: int) -> bool:
    """Whether ``value`` is or reaches an object of ``tree`` within ``depth`` steps through
    closures, partials, bound methods, containers or the attributes of callable objects.
    (Other objects are not entered: a trainer object holding the model is no reference
    the forward uses.)"""
    if id(value) in tree:
        return True
    if depth == 0 or isinstance(value, (torch.Tensor, nn.Module, type, types.ModuleType, str, bytes, int, float)):
        return False
    if isinstance(value, types.MethodType):
        inner: Any = (value.__self__,)
    elif isinstance(value, functools.partial):
        inner = (value.func, *value.args, *value.keywords.values())
    elif isinstance(value, types.FunctionType):
        inner = tuple(_cell(c) for c in value.__closure__ or ())
    elif isinstance(value, (list, tuple, set, frozenset)):
        inner = tuple(value)[:256]
    elif isinstance(value, Mapping):
        inner = tuple(value.values())[:256]
    elif callable(value) and hasattr(value, "__dict__"):  # a callable object (hook-like)
        inner = tuple(vars(value).values())[:256]
    else:
        return False
    return any(_refers(v, tree, depth - 1) for v in inner)


def _cell(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None
