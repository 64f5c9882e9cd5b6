"""``nn.Module`` -> pure function, without ever writing the user's module.

How a call works. :func:`make_functional` analyses the module tree once into a
:class:`_Plan`: one :class:`_Node` per distinct submodule, holding for each of its
``_parameters``/``_buffers``/``_modules`` entries the index of the tensor group (tied
tensors form one group) or of the child node to put there. A call then builds a fresh
shallow copy of every submodule (``object.__new__`` plus a copy of the live ``__dict__``
with new ``_parameters``, ``_buffers`` and ``_modules`` dicts holding the given tensors and
the copied children) and calls the copied root. The user's module is only read, so calls
are thread-safe and an exception in ``forward`` leaves nothing to restore.

Buffers are cloned before the call, so in-place updates (BatchNorm's running statistics)
land in the clones; an update is detected by identity (the buffer was reassigned) or by
the version counters of the clone and of every functorch wrapper under it (``vmap``
alone does not bump the outer counter).

Per-call fix-ups for modules that cache tensors or refer to other modules:

* ``nn.RNNBase`` keeps ``_flat_weights`` (and weak references to them): refreshed on the
  copy, so ``forward`` never calls ``flatten_parameters`` on the caller's tensors;
* attributes holding a module of the tree outside ``_modules``, or a method bound to one,
  and forward hooks that are such bound methods, are redirected to the copies;
* any other reference to a module of the tree (a closure, a ``functools.partial``, a list
  of modules) cannot be redirected: an attribute raises at conversion, a hook warns.
"""

from __future__ import annotations

import difflib
import functools
import types
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

TensorDict = dict[str, torch.Tensor]

_OWN = ("_parameters", "_buffers", "_modules")
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_SKIP_SCAN = frozenset(nn.Module().__dict__)  # torch's own bookkeeping: dicts, hooks, flags
_SCAN_DEPTH = 4
_functorch = getattr(torch._C, "_functorch", None)


# --------------------------------------------------------------------------------------
# The plan: the module tree analysed once.


class _Node:
    """One distinct submodule: where each entry of its three dicts comes from."""

    __slots__ = ("buffers", "children", "cls", "fixes", "module", "norm", "params", "rnn", "sizes")

    def __init__(self, module: nn.Module) -> None:
        self.module, self.cls = module, type(module)
        self.params: tuple[tuple[str, int | None], ...] = ()
        self.buffers: tuple[tuple[str, int | None], ...] = ()
        self.children: tuple[tuple[str, int | None], ...] = ()
        self.sizes = tuple(len(module.__dict__[k]) for k in _OWN)
        self.fixes: tuple[tuple[str, str, Any], ...] = ()
        self.rnn = isinstance(module, nn.RNNBase)
        self.norm = isinstance(module, nn.modules.batchnorm._NormBase)


class _Group:
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

    def slots(self, entries: dict[str, Any]) -> tuple[tuple[str, int | None], ...]:
        return tuple((k, None if v is None else self.index[id(v)]) for k, v in entries.items())


class _Plan:
    """Everything a call needs that does not depend on the call."""

    def __init__(self, root: nn.Module, api: str) -> None:
        _check_convertible(root, api)
        self.root = root
        self.params = _Group("params", root.named_parameters())
        self.buffers = _Group("buffers", root.named_buffers())
        self.nodes: list[_Node] = []
        position: dict[int, int] = {}
        for _, module in root.named_modules():
            position[id(module)] = len(self.nodes)
            self.nodes.append(_Node(module))
        for node in self.nodes:
            d = node.module.__dict__
            node.params = self.params.slots(d["_parameters"])
            node.buffers = self.buffers.slots(d["_buffers"])
            node.children = tuple((k, None if m is None else position[id(m)]) for k, m in d["_modules"].items())
        self.virtual: dict[str, str] = {}  # plain name of a parametrized tensor -> its originals
        for prefix, module in _occurrences(root):
            self._add_aliases(prefix, module)
        tree = dict.fromkeys(position) | dict.fromkeys(self.params.index) | dict.fromkeys(self.buffers.index)
        for path, node in zip((p for p, _ in root.named_modules()), self.nodes):
            node.fixes = _fixes(node.module, path, position, tree, api)
        self.parametrized = bool(self.virtual)
        self.params.index = self.buffers.index = {}  # ids of the tensors seen while building

    def _add_aliases(self, prefix: str, module: nn.Module) -> None:
        d = module.__dict__
        for group, entries in ((self.params, d["_parameters"]), (self.buffers, d["_buffers"])):
            for k, v in entries.items():
                if v is not None:
                    group.aliases.setdefault(prefix + k, group.index[id(v)])
        if parametrize.is_parametrized(module):
            for tensor_name, plist in module.parametrizations.items():
                originals = [f"{prefix}parametrizations.{tensor_name}.{k}" for k in plist._parameters]
                originals += [f"{prefix}parametrizations.{tensor_name}.{k}" for k in plist._buffers]
                self.virtual[prefix + tensor_name] = ", ".join(repr(o) for o in originals)

    def check_fresh(self, api: str) -> None:
        """Refuse to run on a module whose structure changed after conversion."""
        for node in self.nodes:
            m = node.module
            d = m.__dict__
            if type(m) is not node.cls or (len(d["_parameters"]), len(d["_buffers"]), len(d["_modules"])) != node.sizes:
                raise RuntimeError(
                    f"`functx.nn.{api}`: the module {type(m).__name__} was changed after conversion "
                    f"(a parameter, buffer, submodule or parametrization was added or removed). "
                    f"Convert it again with `functx.nn.make_functional`."
                )


def _occurrences(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
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
# What cannot be converted, and what must be redirected per call.


def _check_convertible(root: nn.Module, api: str) -> None:
    if not isinstance(root, nn.Module):
        raise TypeError(f"`functx.nn.{api}`: expected a torch.nn.Module, got {type(root).__name__}.")
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


def _fixes(
    module: nn.Module, path: str, position: dict[int, int], tree: dict[int, None], api: str
) -> tuple[tuple[str, str, Any], ...]:
    """Per-call redirections of ``module``'s attributes and hooks to the copies.

    ``position`` maps ``id`` of each module of the tree to its node; ``tree`` holds the ids
    of its modules, parameters and buffers. Returns ``(kind, key, payload)`` triples:
    ``("module", key, node)`` for an attribute holding a module of the tree,
    ``("method", key, (func, node))`` for a method bound to one, and
    ``("hooks", key, {hook_id: (func, node)})`` for bound-method hooks."""
    fixes: list[tuple[str, str, Any]] = []
    skip = _SKIP_SCAN | ({"_flat_weights"} if isinstance(module, nn.RNNBase) else set())
    for key, value in module.__dict__.items():
        if key in skip:
            continue
        if isinstance(value, nn.Module) and id(value) in position:
            fixes.append(("module", key, position[id(value)]))
        elif isinstance(value, types.MethodType) and id(value.__self__) in position:
            fixes.append(("method", key, (value.__func__, position[id(value.__self__)])))
        elif _refers(value, tree, _SCAN_DEPTH):
            raise ValueError(
                f"`functx.nn.{api}`: attribute {key!r} of {_where(path)} ({type(value).__name__}) refers "
                f"to a module, parameter or buffer of the tree outside `_modules`/`_parameters`/"
                f"`_buffers` (directly, or through a closure, a functools.partial or a container). The "
                f"converted call could not substitute the given tensors there and would silently use "
                f"the module's own. Register submodules with nn.ModuleList / nn.ModuleDict, tensors "
                f"with register_parameter / register_buffer, or store a bound method itself."
            )
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
                    stacklevel=4,
                )
        if rebound:
            fixes.append(("hooks", key, rebound))
    return tuple(fixes)


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


# --------------------------------------------------------------------------------------
# One call.


def resolve(group: _Group, given: Any, plan: _Plan, api: str) -> list[torch.Tensor]:
    """The tensors of ``given`` (a dict keyed by names of ``group``) in group order."""
    if not isinstance(given, Mapping):
        if given is None and not group.names:
            return []
        raise TypeError(
            f"`functx.nn.{api}`: `{group.kind}` must be a dict of tensors keyed by names as in "
            f"`named_{group.noun}s()`, got {type(given).__name__}."
        )
    if given.keys() == group.keyset:  # the common case: exactly the canonical names
        values = [given[k] for k in group.names]
    else:
        values = _resolve_aliases(group, given, plan, api)
    for k, (v, shape) in enumerate(zip(values, group.shapes)):
        if not isinstance(v, torch.Tensor) or v.shape != shape:
            _bad_value(group, k, v, api)
    return values


def _resolve_aliases(group: _Group, given: Mapping[str, Any], plan: _Plan, api: str) -> list[Any]:
    values: list[Any] = [None] * len(group.names)
    seen: list[str | None] = [None] * len(group.names)
    for key, value in given.items():
        k = group.aliases.get(key)
        if k is None:
            _unknown_key(group, key, plan, api)
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


def _unknown_key(group: _Group, key: str, plan: _Plan, api: str) -> None:
    if key in plan.virtual and group.kind == "params":
        raise ValueError(
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
    raise ValueError(f"`functx.nn.{api}`: {group.kind}[{key!r}] is not a {group.noun} of the module.{hint}")


def _bad_value(group: _Group, k: int, value: Any, api: str) -> None:
    name = group.names[k]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`functx.nn.{api}`: {group.kind}[{name!r}] must be a tensor, got {type(value).__name__}.")
    raise ValueError(
        f"`functx.nn.{api}`: {group.kind}[{name!r}] has shape {tuple(value.shape)} but the module's "
        f"tensor has shape {tuple(group.shapes[k])}. (Stacked ensemble parameters are called "
        f"through `functx.vmap`.)"
    )


def build(
    plan: _Plan, params: list[torch.Tensor], buffers: list[torch.Tensor], training: bool | None
) -> list[nn.Module]:
    """Fresh shallow copies of every node holding ``params``/``buffers``; root first."""
    nodes = plan.nodes
    copies = [object.__new__(node.cls) for node in nodes]
    for node, c in zip(nodes, copies):
        d = node.module.__dict__.copy()
        d["_parameters"] = {k: None if g is None else params[g] for k, g in node.params}
        d["_buffers"] = {k: None if g is None else buffers[g] for k, g in node.buffers}
        d["_modules"] = {k: None if j is None else copies[j] for k, j in node.children}
        if training is not None:
            d["training"] = training
        for kind, key, payload in node.fixes:
            d[key] = _fixed(kind, payload, d[key], copies)
        object.__setattr__(c, "__dict__", d)
        if node.rnn:
            _refresh_rnn(c, d)
    return copies


def _fixed(kind: str, payload: Any, value: Any, copies: list[nn.Module]) -> Any:
    if kind == "module":
        return copies[payload]
    if kind == "method":
        func, j = payload
        return types.MethodType(func, copies[j])
    hooks = value.copy()
    for hook_id, (func, j) in payload.items():
        hooks[hook_id] = types.MethodType(func, copies[j])
    return hooks


def _refresh_rnn(rnn: nn.Module, d: dict[str, Any]) -> None:
    """Point an RNN copy's cached ``_flat_weights`` at the given tensors (never calling
    ``flatten_parameters``, which would re-seat the caller's tensors on CUDA)."""
    flat = [getattr(rnn, name) if hasattr(rnn, name) else None for name in d["_flat_weights_names"]]
    d["_flat_weights"] = flat
    if "_flat_weight_refs" in d:
        d["_flat_weight_refs"] = [None if w is None else weakref.ref(w) for w in flat]


def _clones(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Clones with version counters: made outside inference mode (inference tensors have
    none), still usable by a forward that runs in it."""
    if not tensors or not torch.is_inference_mode_enabled():
        return [t.clone() for t in tensors]
    with torch.inference_mode(False):
        return [t.clone() for t in tensors]


def versions(t: torch.Tensor) -> tuple[int, ...] | int:
    """Version counter of ``t`` and of every functorch wrapper level under it."""
    if _functorch is None or not _functorch.is_functorch_wrapped_tensor(t):
        return t._version
    out = []
    while True:
        out.append(t._version)
        if not _functorch.is_functorch_wrapped_tensor(t):
            return tuple(out)
        t = _functorch.get_unwrapped(t)


def buffers_after(
    plan: _Plan, copies: list[nn.Module], clones: list[torch.Tensor], before: list[Any]
) -> tuple[list[torch.Tensor], set[int]]:
    """The buffers as the forward left them, and the groups it changed (reassigned, or
    changed in place as told by version counters and by :func:`_norm_ran`)."""
    finals, changed = list(clones), set()
    for node, c in zip(plan.nodes, copies):
        entries = c.__dict__["_buffers"]
        for k, g in node.buffers:
            now = entries.get(k)
            if g is None or g in changed:
                continue
            if now is not clones[g] and isinstance(now, torch.Tensor):
                finals[g] = now
                changed.add(g)
            elif versions(clones[g]) != before[g]:
                changed.add(g)
        if node.norm and _norm_ran(dict(node.buffers), c.__dict__, changed):
            changed.update(g for k, g in node.buffers if k in ("running_mean", "running_var") and g is not None)
    return finals, changed


def _norm_ran(groups: dict[str, int | None], d: dict[str, Any], changed: set[int]) -> bool:
    """Whether a ``_NormBase`` (BatchNorm, InstanceNorm) updated its running statistics.
    ``batch_norm`` writes them without bumping their version counters, but BatchNorm's
    ``num_batches_tracked.add_(1)`` does bump its own."""
    nbt = groups.get("num_batches_tracked")
    if nbt is not None:
        return nbt in changed
    return bool(d.get("training")) and bool(d.get("track_running_stats"))


def check_no_parametrize_cache(plan: _Plan, api: str) -> None:
    if plan.parametrized and parametrize._cache_enabled:
        raise RuntimeError(
            f"`functx.nn.{api}`: called inside `torch.nn.utils.parametrize.cached()`, whose cache is "
            f"keyed by id(module); per-call module copies could reuse a stale entry. Call it outside "
            f"the context (each call computes every parametrization once per access)."
        )


def same_structure(modules: Sequence[nn.Module], flags: bool, api: str) -> None:
    """``modules`` have the same submodule classes, names, shapes, dtypes (and training
    flags, if ``flags``)."""
    sig = _signature(modules[0], flags)
    for i, m in enumerate(modules[1:], 1):
        if not isinstance(m, nn.Module):
            raise TypeError(f"`functx.nn.{api}`: modules[{i}] is a {type(m).__name__}, not a torch.nn.Module.")
        other = _signature(m, flags)
        for what, a, b in zip(("submodules (path, class[, training])", "parameters", "buffers"), sig, other):
            if a != b:
                diff = next((f"{x} vs {y}" for x, y in zip(a, b) if x != y), f"{len(a)} vs {len(b)} entries")
                raise ValueError(
                    f"`functx.nn.{api}`: modules[{i}] differs from modules[0] in its {what}: {diff}. "
                    f"Stacked modules must be copies of one architecture (e.g. built by the same code)."
                )


def _signature(m: nn.Module, flags: bool) -> tuple[list[Any], list[Any], list[Any]]:
    mods = [(p, type(s).__name__) + ((s.training,) if flags else ()) for p, s in m.named_modules()]
    params = [(n, tuple(t.shape), t.dtype) for n, t in m.named_parameters()]
    bufs = [(n, tuple(t.shape), t.dtype) for n, t in m.named_buffers()]
    return mods, params, bufs


# --------------------------------------------------------------------------------------
# The public objects.


class FunctionalModule:
    """A module as a pure function of its tensors: ``fmodel(params, buffers, *args, **kwargs)``.

    Made by :func:`make_functional` or :func:`stack`; immutable and thread-safe. See
    :mod:`functx.nn` for the calling conventions.
    """

    __slots__ = ("_plan", "_training")

    def __init__(self, plan: _Plan, training: bool | None) -> None:
        self._plan, self._training = plan, training

    def __call__(
        self,
        params: Mapping[str, torch.Tensor],
        buffers: Mapping[str, torch.Tensor] | None,
        /,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        """Run the module's forward with ``params`` and ``buffers``; return its output.

        Args:
            params: a dict with one tensor per parameter (or tied group), keyed by
                ``named_parameters()`` names.
            buffers: a dict with one tensor per buffer, keyed by ``named_buffers()``
                names (``{}`` or ``None`` for a module without buffers).
            *args: positional arguments of the module's ``forward``.
            **kwargs: keyword arguments of the module's ``forward`` (all of them: this
                call takes no options of its own).

        Returns:
            What the module's ``forward`` returns.

        Raises:
            ValueError: if the forward updated a buffer (BatchNorm in training mode):
                use :meth:`stateful` to receive the new buffers, or
                :meth:`with_training` ``(False)``.

        Example:
            >>> import torch, functx.nn
            >>> fmodel, params, buffers = functx.nn.make_functional(torch.nn.Linear(2, 1))
            >>> params = {"weight": torch.ones(1, 2), "bias": torch.zeros(1)}
            >>> fmodel(params, buffers, torch.tensor([[1.0, 2.0]]))
            tensor([[3.]])
        """
        out, _, changed = self._run(params, buffers, args, kwargs, "FunctionalModule.__call__")
        if changed:
            names = ", ".join(repr(self._plan.buffers.names[g]) for g in sorted(changed))
            raise ValueError(
                f"`functx.nn.FunctionalModule.__call__`: the forward updated buffer(s) {names} (as "
                f"BatchNorm does with its running statistics in training mode); the plain call never "
                f"drops an update. Use `out, new_buffers = fmodel.stateful(params, buffers, ...)`, or "
                f"evaluate in eval mode with `fmodel.with_training(False)`."
            )
        return out

    def stateful(
        self,
        params: Mapping[str, torch.Tensor],
        buffers: Mapping[str, torch.Tensor] | None,
        /,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[Any, TensorDict]:
        """Like calling ``fmodel``, also returning the buffers as the forward left them.

        Neither the module nor the tensors in ``buffers`` are written: the forward runs
        on clones of the buffers.

        Args:
            params: the parameters, as for ``fmodel(...)``.
            buffers: the buffers, as for ``fmodel(...)``.
            *args: positional arguments of the module's ``forward``.
            **kwargs: keyword arguments of the module's ``forward``.

        Returns:
            ``(out, new_buffers)``: ``new_buffers`` has one entry per buffer, keyed like
            the ``buffers`` returned by :func:`make_functional`, holding the values the
            forward left (new tensors, never the ones passed in).

        Example:
            >>> import torch, functx.nn
            >>> bn = torch.nn.BatchNorm1d(1, momentum=0.5)
            >>> fmodel, params, buffers = functx.nn.make_functional(bn, training=True)
            >>> out, new = fmodel.stateful(params, buffers, torch.tensor([[1.0], [3.0]]))
            >>> new["running_mean"], buffers["running_mean"]
            (tensor([1.]), tensor([0.]))
        """
        out, finals, _ = self._run(params, buffers, args, kwargs, "FunctionalModule.stateful")
        return out, dict(zip(self._plan.buffers.names, finals))

    def _run(
        self, params: Any, buffers: Any, args: tuple[Any, ...], kwargs: dict[str, Any], api: str
    ) -> tuple[Any, list[torch.Tensor], set[int]]:
        plan = self._plan
        plan.check_fresh(api)
        check_no_parametrize_cache(plan, api)
        p = resolve(plan.params, params, plan, api)
        clones = _clones(resolve(plan.buffers, buffers, plan, api))
        before = [versions(c) for c in clones]
        copies = build(plan, p, clones, self._training)
        out = copies[0](*args, **kwargs)
        if not clones:
            return out, clones, set()
        return (out, *buffers_after(plan, copies, clones, before))

    def with_training(self, training: bool | None) -> FunctionalModule:
        """The same function with every submodule in training (``True``) or eval (``False``)
        mode, or following the module's own flags (``None``). The module is not touched.

        Args:
            training: the mode to run in.

        Returns:
            A new :class:`FunctionalModule` sharing this one's analysis of the module.

        Example:
            >>> import torch, functx.nn
            >>> fmodel, params, buffers = functx.nn.make_functional(torch.nn.Dropout(0.5))
            >>> fmodel.with_training(False)(params, buffers, torch.ones(3))
            tensor([1., 1., 1.])
        """
        return FunctionalModule(self._plan, check_training(training, "FunctionalModule.with_training"))

    @property
    def training(self) -> bool | None:
        """The mode forced on every submodule, or ``None`` to follow the module's flags."""
        return self._training

    @property
    def param_names(self) -> tuple[str, ...]:
        """The keys of ``params``, as ``named_parameters()`` yields them."""
        return tuple(self._plan.params.names)

    @property
    def buffer_names(self) -> tuple[str, ...]:
        """The keys of ``buffers``, as ``named_buffers()`` yields them."""
        return tuple(self._plan.buffers.names)

    @property
    def trainable(self) -> frozenset[str]:
        """Names of the parameters whose ``requires_grad`` is currently set on the module;
        a filter for :func:`functx.nn.partition`."""
        return frozenset(n for n, p in self._plan.root.named_parameters() if p.requires_grad)

    def __repr__(self) -> str:
        plan = self._plan
        return (
            f"FunctionalModule({type(plan.root).__name__}, params={len(plan.params.names)}, "
            f"buffers={len(plan.buffers.names)}, training={self._training})"
        )


def check_training(training: Any, api: str) -> bool | None:
    if training is not None and not isinstance(training, bool):
        raise TypeError(f"`functx.nn.{api}`: `training` must be True, False or None, got {training!r}.")
    return training


def make_functional(
    module: nn.Module, /, *, training: bool | None = None
) -> tuple[FunctionalModule, TensorDict, TensorDict]:
    """Turn ``module`` into a pure function of its parameters and buffers.

    The module is analysed once and never written, not even temporarily: each call runs
    its ``forward`` (with hooks and parametrizations) on a per-call shallow copy holding
    the given tensors.

    Args:
        module: the ``torch.nn.Module`` to convert. Not scripted or compiled.
        training: run every submodule in training (``True``) or eval (``False``) mode,
            or follow the module's own flags at call time (``None``). (default: ``None``)

    Returns:
        ``(fmodel, params, buffers)``: the :class:`FunctionalModule`
        ``fmodel(params, buffers, *args, **kwargs)``, and dicts keyed by the
        ``named_parameters()`` / ``named_buffers()`` names holding the module's tensors
        detached (sharing storage, not requiring grad, plain tensors rather than
        ``Parameter`` objects). Tied tensors appear once, under their first name.

    Example:
        >>> import torch, functx.nn
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        >>> fmodel, params, buffers = functx.nn.make_functional(model)
        >>> sorted(params)
        ['0.bias', '0.weight', '2.bias', '2.weight']
        >>> x = torch.randn(5, 3)
        >>> torch.equal(fmodel(params, buffers, x), model(x))
        True
        >>> grads = functx.grad(lambda p: fmodel(p, buffers, x).sum())(params)
        >>> grads["2.weight"].shape
        torch.Size([1, 4])
    """
    fmodel = FunctionalModule(_Plan(module, "make_functional"), check_training(training, "make_functional"))
    params = {n: t.detach() for n, t in module.named_parameters()}
    buffers = {n: t.detach() for n, t in module.named_buffers()}
    return fmodel, params, buffers


def stack(
    modules: Sequence[nn.Module], /, *, training: bool | None = None
) -> tuple[FunctionalModule, TensorDict, TensorDict]:
    """Convert an ensemble of same-architecture modules for :func:`functx.vmap`.

    Args:
        modules: a non-empty list, tuple or ``nn.ModuleList`` of modules with the same
            submodule classes, names, shapes, dtypes and training flags (for example
            built by the same code with different seeds). The function runs the code of
            ``modules[0]`` (its non-tensor attributes are used for every member).
        training: as in :func:`make_functional`. (default: ``None``)

    Returns:
        ``(fmodel, stacked_params, stacked_buffers)``: ``fmodel`` as from
        :func:`make_functional` and dicts whose tensors have a new leading dimension of
        size ``len(modules)`` (detached copies). Map over it with
        ``functx.vmap(fmodel, in_dims=(0, 0, None))``.

    Example:
        >>> import torch, functx.nn
        >>> members = [torch.nn.Linear(3, 2) for _ in range(4)]
        >>> fmodel, params, buffers = functx.nn.stack(members)
        >>> params["weight"].shape
        torch.Size([4, 2, 3])
        >>> x = torch.randn(5, 3)
        >>> out = functx.vmap(fmodel, in_dims=(0, 0, None))(params, buffers, x)
        >>> out.shape, torch.allclose(out[2], members[2](x))
        (torch.Size([4, 5, 2]), True)
    """
    if not isinstance(modules, (list, tuple, nn.ModuleList)):
        raise TypeError(
            f"`functx.nn.stack`: `modules` must be a list or tuple of modules, got {type(modules).__name__}."
        )
    modules = list(modules)
    if not modules:
        raise ValueError("`functx.nn.stack`: `modules` is empty; pass at least one module.")
    if not isinstance(modules[0], nn.Module):
        raise TypeError(f"`functx.nn.stack`: modules[0] is a {type(modules[0]).__name__}, not a torch.nn.Module.")
    training = check_training(training, "stack")
    same_structure(modules, training is None, "stack")
    fmodel = FunctionalModule(_Plan(modules[0], "stack"), training)
    members_p = [dict(m.named_parameters()) for m in modules]
    members_b = [dict(m.named_buffers()) for m in modules]
    params = {n: torch.stack([p[n].detach() for p in members_p]) for n in fmodel.param_names}
    buffers = {n: torch.stack([b[n].detach() for b in members_b]) for n in fmodel.buffer_names}
    return fmodel, params, buffers
