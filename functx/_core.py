"""The small core every transform is built on.

A transform call goes through the same few steps:

1. validate the transform's options once, when the transform is created
   (:func:`check_callable`, :func:`check_argnums`, :func:`check_bool`, :func:`check_chunk_size`);
2. at call time build a :class:`Call`: look up the :class:`Selection` of ``argnums`` for
   this number of arguments (resolved and validated once per structure, then cached),
   flatten the differentiated arguments to tensor leaves with optree and check them;
3. hand ``func`` in one of the calling conventions (:meth:`Call.fn`: a function of flat
   tensors returning flat tensors) to a ``torch.func`` primitive, inside the one
   :class:`InplaceGuard`;
4. rebuild pytrees with the input structure of the ``Call`` and the :class:`Outputs`
   record the convention returned.

The convention records the output structure and any non-tensor ``aux`` values in its
:class:`Outputs` while ``func`` runs (JAX's ``flatten_fun`` thunk; it also traces under
``torch.compile``), so ``aux`` may hold arbitrary Python objects and only tensors cross
into ``torch.func``. The ``Call`` itself is never changed after construction.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from . import _torch_internals
from ._torch_internals import PLAIN_TENSORS, engine_grad, is_exporting, lift, transforms_active, version
from ._tree import (
    PyTree,
    TreeSpec,
    check_float_leaves,
    input_hint,
    is_differentiable,
    leaf_paths,
    tree_flatten,
    tree_structure,
    tree_unflatten,
)
from ._validate import check_bool, check_callable, check_choice, check_chunk_size, describe

__all__ = [  # re-exported: the rooms import them from here
    "check_bool",
    "check_callable",
    "check_choice",
    "check_chunk_size",
    "describe",
    "input_hint",
    "is_differentiable",
]

_UNSET = tree_structure(None)
_RANGES: list[tuple[int, ...]] = [tuple(range(n)) for n in range(64)]


def all_argnums(n: int) -> tuple[int, ...]:
    """``(0, 1, ..., n - 1)``, cached for small ``n``."""
    return _RANGES[n] if n < len(_RANGES) else tuple(range(n))


# --------------------------------------------------------------------------------------
# Option validation, done once when a transform is created.


def check_argnums(argnums: Any, api: str) -> int | tuple[int, ...]:
    """Validate the form of ``argnums`` (an int or a non-empty sequence of distinct ints)."""
    if isinstance(argnums, int) and not isinstance(argnums, bool):
        return argnums
    if isinstance(argnums, (tuple, list)):
        if not argnums:
            raise ValueError(f"`functx.{api}`: `argnums` must not be empty.")
        for a in argnums:
            if not isinstance(a, int) or isinstance(a, bool):
                raise TypeError(f"`functx.{api}`: `argnums` must be an int or a tuple of ints, got {argnums!r}.")
        return tuple(argnums)
    raise TypeError(f"`functx.{api}`: `argnums` must be an int or a tuple of ints, got {argnums!r}.")


def _resolve_argnum(a: int, nargs: int, api: str) -> int:
    i = a + nargs if a < 0 else a
    if not 0 <= i < nargs:
        raise ValueError(
            f"`functx.{api}`: argnums={a} is out of range: the function was called with {nargs} positional argument(s)."
        )
    return i


def resolve_argnums(argnums: int | tuple[int, ...], nargs: int, api: str) -> int | tuple[int, ...]:
    """Turn a validated ``argnums`` into non-negative indices for a call with ``nargs`` arguments."""
    if isinstance(argnums, int):
        return _resolve_argnum(argnums, nargs, api)
    resolved = tuple(_resolve_argnum(a, nargs, api) for a in argnums)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"`functx.{api}`: `argnums` must not repeat an argument, got {argnums!r}.")
    return resolved


def arg_root(func: Callable[..., Any], index: int, base: str = "args") -> str:
    """Name positional argument ``index`` of ``func`` for messages: its parameter name if known."""
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        params = []
    if index < len(params) and params[index].kind in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        return params[index].name
    return f"{base}[{index}]"


def plain_eager(*tensors: torch.Tensor | None) -> bool:
    """Whether we run in plain eager mode: no ``torch.func``/functx transform active (the
    functorch interpreter stack is empty), not compiling, exporting or tracing, and the given
    tensors are plain tensors (not fake, functional or other subclasses).

    Plain autograd is used only there (where it is measurably faster than ``torch.func`` and
    gives the same result), and solvers may stop early by reading tensor values only there.
    """
    if torch.compiler.is_compiling() or is_exporting() or torch.jit.is_tracing():
        return False
    if transforms_active():
        return False
    for t in tensors:  # a loop, not all(genexpr): this runs on every eager call
        if t is not None and type(t) not in PLAIN_TENSORS:
            return False
    return True


def plain_autograd(*tensors: torch.Tensor) -> bool:
    """Whether plain ``torch.autograd.grad`` computes what ``torch.func`` would: plain eager
    mode, outside inference mode, and no tensor is part of an outer autograd graph (then
    ``torch.func``'s results would be differentiable with respect to it)."""
    if not plain_eager(*tensors) or torch.is_inference_mode_enabled():
        return False
    for t in tensors:
        if t.requires_grad:
            return False
    return True


def reaches_other_leaves(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> bool:
    """Whether the autograd graph of ``outputs`` reaches a tensor requiring grad other than
    ``inputs`` (a tensor ``func`` captured, such as model weights or a meta-learned rate).

    ``torch.func`` keeps its results differentiable with respect to such tensors; the plain
    autograd paths then keep their graph too (``create_graph=True``) instead of detaching.
    On the hot path of every plain-autograd call: one pass over the graph's nodes.
    """
    ours = {id(x) for x in inputs}
    stack = []
    for out in outputs:
        node = out.grad_fn
        if node is not None:
            stack.append(node)
        elif out.requires_grad and id(out) not in ours:
            return True
    seen = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if type(node) is _ACCUMULATE_GRAD:  # a leaf tensor requiring grad
            if id(node.variable) not in ours:  # type: ignore[attr-defined]
                return True
            continue
        for fn, _ in node.next_functions:
            if fn is not None:
                stack.append(fn)
    return False


# The type of the graph node that ends in a leaf requiring grad (``AccumulateGrad``).
_ACCUMULATE_GRAD = type(torch.empty(0, requires_grad=True).view(0).grad_fn.next_functions[0][0])  # type: ignore[union-attr]


def autograd_grad(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    grad_outputs: Sequence[torch.Tensor] | None = None,
    *,
    create_graph: bool = False,
    retain_graph: bool | None = None,
    is_grads_batched: bool = False,
) -> tuple[torch.Tensor, ...]:
    """``torch.autograd.grad`` with torch.func's conventions: outputs that do not require grad
    are skipped, and inputs they do not reach get zeros (with the leading batch axis of
    ``grad_outputs`` when ``is_grads_batched``)."""
    keep = [k for k, out in enumerate(outputs) if out.requires_grad]
    batch = (grad_outputs[0].shape[0],) if is_grads_batched and grad_outputs else ()
    if not keep:
        return tuple(_zeros(x, batch) for x in inputs)
    kept_outputs = [outputs[k] for k in keep]
    kept_grads = None if grad_outputs is None else [grad_outputs[k] for k in keep]
    grads = None if is_grads_batched else engine_grad(kept_outputs, inputs, kept_grads, create_graph, retain_graph)
    if grads is None:
        grads = torch.autograd.grad(
            kept_outputs,
            inputs,
            kept_grads,
            create_graph=create_graph,
            retain_graph=retain_graph,
            allow_unused=True,
            is_grads_batched=is_grads_batched,
        )
    for g in grads:
        if g is None:
            break
    else:
        return grads  # type: ignore[return-value]  # every input reached (`None in grads` would compare tensors)
    return tuple(_zeros(x, batch) if g is None else g for g, x in zip(grads, inputs))


def _zeros(x: torch.Tensor, batch: tuple[int, ...]) -> torch.Tensor:
    return x.new_zeros(batch + x.shape) if batch else torch.zeros_like(x)


# --------------------------------------------------------------------------------------
# The pieces of one call of a transform: a Selection (cached per structure), a Call
# (immutable), an Outputs record (returned by the calling convention that fills it) and
# the InplaceGuard.


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which positional arguments a transform differentiates, resolved for calls with
    ``nargs`` positional arguments. Built and validated once per ``(argnums, nargs)``
    (:func:`select`), then shared by every call with that structure.

    ``argnums=None`` means "all positional arguments, as a tuple" (``vjp``/``jvp`` style);
    an int selects one argument (its pytree is the differentiated structure); a tuple
    selects several (a tuple of their pytrees).
    """

    argnums: int | tuple[int, ...] | None
    """Resolved (non-negative) ``argnums``, or ``None``."""
    chosen: tuple[int, ...]
    """The positions of the differentiated arguments."""
    others: tuple[int, ...]
    """The positions of the other arguments (they belong to ``func``)."""

    def pick(self, args: tuple[Any, ...]) -> Any:
        """The differentiated part of ``args``: one pytree, or a tuple of them."""
        argnums = self.argnums
        if argnums is None:
            return args
        return args[argnums] if isinstance(argnums, int) else tuple(args[i] for i in argnums)

    def place(self, args: list[Any], selected: Any) -> list[Any]:
        """``args`` with the differentiated part replaced by ``selected`` (in place)."""
        argnums = self.argnums
        if isinstance(argnums, int):
            args[argnums] = selected
        else:
            for i, sub in zip(self.chosen, selected):
                args[i] = sub
        return args


_SELECTIONS: dict[tuple[Any, int], Selection] = {}


def select(argnums: int | tuple[int, ...] | None, nargs: int, api: str) -> Selection:
    """The :class:`Selection` of ``argnums`` for ``nargs`` arguments (validated on first use)."""
    key = (argnums, nargs)
    found = _SELECTIONS.get(key)
    if found is not None:
        return found
    if argnums is None:
        chosen = all_argnums(nargs)
        resolved: int | tuple[int, ...] | None = None
    else:
        resolved = resolve_argnums(argnums, nargs, api)
        chosen = (resolved,) if isinstance(resolved, int) else resolved
    found = Selection(resolved, chosen, tuple(i for i in range(nargs) if i not in chosen))
    # bounded (argnums and nargs are small ints in practice); not stored while compiling
    if len(_SELECTIONS) < 1024 and not torch.compiler.is_compiling():
        _SELECTIONS[key] = found
    return found


class Outputs:
    """What ``func`` returned, recorded by a calling convention while ``func`` runs (JAX's
    ``flatten_fun`` thunk): the output structure and the aux structure and its non-tensor
    leaves. A convention returns its record with the function (:meth:`Call.fn`)."""

    __slots__ = ("aux_spec", "aux_static", "has_aux", "spec")

    def __init__(self, has_aux: bool) -> None:
        self.has_aux = has_aux
        self.spec: TreeSpec = _UNSET
        self.aux_spec: TreeSpec = _UNSET
        self.aux_static: list[Any] = []

    def unflatten(self, leaves: Sequence[Any]) -> PyTree:
        """A pytree with the output's structure."""
        return tree_unflatten(self.spec, leaves)

    def aux(self, aux_tensors: Sequence[torch.Tensor]) -> PyTree:
        """The aux pytree, its tensors taken from ``aux_tensors``."""
        tensors = iter(aux_tensors)
        return tree_unflatten(self.aux_spec, [next(tensors) if a is None else a for a in self.aux_static])

    def with_aux(self, result: Any, aux_tensors: Sequence[torch.Tensor]) -> Any:
        """``result`` or ``(result, aux)`` depending on ``has_aux``."""
        return (result, self.aux(aux_tensors)) if self.has_aux else result


Convention = Literal["flat", "torch", "scalar", "scalar_no_aux"]


class Call:
    """One call of a transform: ``func``, its arguments, the :class:`Selection` and the
    differentiated leaves with their structure. Set once in ``__init__``, never changed.

    The functions handed to ``torch.func`` come from :meth:`fn` (the calling conventions);
    what they learn while ``func`` runs goes to the :class:`Outputs` record returned with them.
    """

    __slots__ = ("api", "args", "func", "has_aux", "holomorphic", "in_spec", "kwargs", "leaves", "roots", "sel")

    def __init__(
        self,
        api: str,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        argnums: int | tuple[int, ...] | None,
        has_aux: bool,
        roots: Sequence[str] | None = None,
        holomorphic: bool | None = None,
    ) -> None:
        self.api, self.func, self.args, self.kwargs, self.has_aux = api, func, args, kwargs, has_aux
        self.roots = roots
        self.sel = select(argnums, len(args), api)
        self.leaves, self.in_spec = tree_flatten(self.sel.pick(args))
        if not all(map(is_differentiable, self.leaves)):
            check_float_leaves(self.leaves, self.input_paths, api=api, what="differentiated input ")
        # None: complex outputs are not checked (vjp, jvp). Otherwise JAX's rule for
        # jacrev/jacfwd/hessian: with holomorphic every differentiated input and every
        # output must be complex; without, outputs must be real (see the _jacobian doc).
        self.holomorphic = holomorphic
        if holomorphic:
            check_complex(self.leaves, self.input_paths, True, "input", api)

    def with_args(self, args: tuple[Any, ...]) -> Call:
        """The same call with other positional arguments of the same structure (the lifted
        arguments of an inner level); the leaves are kept."""
        new = object.__new__(Call)
        for name in Call.__slots__:
            object.__setattr__(new, name, getattr(self, name))
        new.args = args
        return new

    # -- naming, for errors -----------------------------------------------------------
    def _root(self, i: int) -> str:
        if self.roots is not None:
            return f"{self.roots[0]}[{i}]"
        return arg_root(self.func, i)

    def input_paths(self) -> list[str]:
        """Key paths of the differentiated leaves, e.g. ``["params['w']", "x"]``."""
        return [p for i in self.sel.chosen for p in leaf_paths(self.args[i], self._root(i))]

    def require_leaves(self, name: str) -> None:
        """``ValueError`` when there is nothing to differentiate (forward mode needs a tangent)."""
        if not self.leaves:
            raise ValueError(
                f"`functx.{self.api}`: `{name}` must contain at least one floating-point or complex "
                f"tensor to differentiate with respect to, got {self.args!r}."
            )

    def inplace_error(self, k: int) -> ValueError:
        return ValueError(
            f"`functx.{self.api}`: `func` writes in place to its differentiated input {self.input_paths()[k]} "
            f"(for example `x.mul_(2)`, `x += 1` or `x[0] = 0`). functx never changes the tensors it "
            f"differentiates, in any mode: compute a new tensor instead (`x = x * 2`), or pass the tensor "
            f"in an argument not listed in `argnums` (those belong to `func`, which may write them)."
        )

    # -- the two kinds of argument ----------------------------------------------------
    # A differentiated input is never changed: an in-place write to it raises, in every
    # mode (InplaceGuard). A non-differentiated positional argument belongs to `func`,
    # which may write it in place as under torch.func (it is wrapped at the running
    # transform's level).

    def call_func(self, leaves: Sequence[torch.Tensor]) -> Any:
        """``func`` at ``leaves`` (the differentiated inputs), other arguments as given."""
        sel = self.sel
        selected = tree_unflatten(self.in_spec, leaves)
        if sel.argnums is None:
            return self.func(*selected, **self.kwargs)
        lifted = sel.others and not torch.compiler.is_compiling() and transforms_active()
        args = self.lifted_args() if lifted else list(self.args)
        return self.func(*sel.place(args, selected), **self.kwargs)

    def lifted_args(self) -> list[Any]:
        """The positional arguments with the tensors of the non-differentiated ones wrapped at
        the level of the innermost running transform (see ``_torch_internals.lift``)."""
        args = list(self.args)
        for i in self.sel.others:
            arg = args[i]
            if isinstance(arg, torch.Tensor):
                args[i] = lift((arg,))[0]
                continue
            leaves, spec = tree_flatten(arg)
            if any(isinstance(t, torch.Tensor) for t in leaves):
                args[i] = tree_unflatten(spec, lift(leaves))
        return args

    def static_tensors(self) -> list[torch.Tensor]:
        """The tensors in the non-differentiated positional arguments."""
        if self.sel.argnums is None:
            return []
        leaves = [leaf for i in self.sel.others for leaf in tree_flatten(self.args[i])[0]]
        return [t for t in leaves if isinstance(t, torch.Tensor)]

    # -- the calling conventions ------------------------------------------------------
    def fn(self, convention: Convention, outputs: Outputs | None = None) -> tuple[Callable[..., Any], Outputs]:
        """``func`` as a function of flat tensors in one of the calling conventions of
        :data:`CONVENTIONS`, and the :class:`Outputs` record it fills while it runs (a new
        one unless ``outputs`` is given)."""
        outputs = Outputs(self.has_aux) if outputs is None else outputs
        return CONVENTIONS[convention](self, outputs), outputs

    def check_outputs(self, out: Any, out_leaves: Sequence[Any]) -> None:
        """The output checks of :data:`CONVENTIONS` ``"flat"``/``"torch"``."""
        if not out_leaves:
            raise ValueError(f"`functx.{self.api}`: `func` returned no tensors to differentiate (got {out!r}).")
        if self.holomorphic is not None:
            check_complex(out_leaves, lambda: leaf_paths(out, "output"), self.holomorphic, "output", self.api)
        if not all(map(is_differentiable, out_leaves)):
            check_float_leaves(out_leaves, lambda: leaf_paths(out, "output"), api=self.api, hint=self._aux_hint(out))

    def _aux_hint(self, out: Any) -> str:
        if not self.has_aux and _is_pair(out):
            return "`func` returned a pair: did you forget has_aux=True?"
        return "Every output of `func` is differentiated; return other values as `aux` (has_aux=True)."

    def split_aux(self, result: Any, outputs: Outputs) -> tuple[Any, tuple[torch.Tensor, ...]]:
        """``(output, aux_tensors)`` of ``func``'s result; records the aux structure."""
        if not self.has_aux:
            return result, ()
        if not isinstance(result, (tuple, list)):
            raise TypeError(
                f"`functx.{self.api}`: with has_aux=True, `func` must return a pair (output, aux), "
                f"got {describe(result)}."
            )
        if len(result) != 2:
            raise ValueError(
                f"`functx.{self.api}`: with has_aux=True, `func` must return a pair (output, aux), "
                f"got a {type(result).__name__} of length {len(result)}."
            )
        out, aux = result
        aux_leaves, outputs.aux_spec = tree_flatten(aux)
        outputs.aux_static = [None if isinstance(a, torch.Tensor) else a for a in aux_leaves]
        return out, tuple(a for a in aux_leaves if isinstance(a, torch.Tensor))

    def unflatten_in(self, leaves: Sequence[Any]) -> PyTree:
        """A pytree with the structure of the differentiated inputs."""
        return tree_unflatten(self.in_spec, leaves)


# The calling conventions of `func` for torch.func, as data: name -> builder(call, outputs).
# Each pays for itself (measured side by side, benchmarks/bench_core.py rows in brackets):
# * flat    ((outputs,), (aux,)): records the output structure; used where several outputs
#           and aux must be kept apart (linearize, the empty-input paths);
# * torch   bare tensor, aux only with has_aux: ~13% faster than flat with has_aux=True on
#           the Jacobian engine [jacrev/jacfwd R^256, hessian R^256, per-sample Hessians];
# * scalar  (scalar, aux): the plain-autograd gradient and hvp [grad overhead, hvp MLP];
# * scalar_no_aux: the scalar alone; ~7% faster than scalar with has_aux=True, and ~45%
#           faster than torch (no optree flatten of the output) on the gradient of the
#           nested path [per-sample gradients].


def _flat_convention(call: Call, outputs: Outputs) -> Callable[..., Any]:
    def flat_fn(*leaves: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        out, aux_tensors = call.split_aux(call.call_func(leaves), outputs)
        out_leaves, outputs.spec = tree_flatten(out)
        call.check_outputs(out, out_leaves)
        return tuple(out_leaves), aux_tensors

    return flat_fn


def _torch_convention(call: Call, outputs: Outputs) -> Callable[..., Any]:
    flat_fn = _flat_convention(call, outputs)
    has_aux = call.has_aux

    def torch_fn(*leaves: torch.Tensor) -> Any:
        outs, aux = flat_fn(*leaves)
        return torch_result(outs, aux, has_aux)

    return torch_fn


def _scalar_convention(call: Call, outputs: Outputs) -> Callable[..., Any]:
    def scalar_fn(*leaves: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        out, aux_tensors = call.split_aux(call.call_func(leaves), outputs)
        check_scalar(out, call.api, call.has_aux)
        return out, aux_tensors

    return scalar_fn


def _scalar_no_aux_convention(call: Call, outputs: Outputs) -> Callable[..., Any]:
    def scalar_fn_no_aux(*leaves: torch.Tensor) -> torch.Tensor:
        out = call.call_func(leaves)
        check_scalar(out, call.api, False)
        return out  # type: ignore[no-any-return]

    return scalar_fn_no_aux


CONVENTIONS: dict[str, Callable[[Call, Outputs], Callable[..., Any]]] = {
    "flat": _flat_convention,
    "torch": _torch_convention,
    "scalar": _scalar_convention,
    "scalar_no_aux": _scalar_no_aux_convention,
}


def tracked_copies(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Clones of ``tensors`` that are normal tensors (with a version counter, usable by
    autograd) even inside ``torch.inference_mode()`` or when ``tensors`` are inference tensors."""
    if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
        with torch.inference_mode(False):
            return [t.clone() for t in tensors]
    return [t.clone() for t in tensors]


class InplaceGuard:
    """The one in-place guard of every transform: ``func`` never changes the tensors it
    differentiates, in any mode.

    ``with InplaceGuard(call, copy=False) as leaves:`` (reverse mode) yields the caller's
    leaves; torch refuses an in-place write to them with a ``RuntimeError``.

    ``with InplaceGuard(call, copy=True) as leaves:`` (forward mode, where torch would let
    ``func`` write the caller's tensors) yields copies and checks their version counters on
    exit. Compiled code gets the copies without the check (they still protect the caller).

    On a ``RuntimeError`` in the block (both modes: torch also refuses some writes in forward
    mode, for example to an inference tensor) the guard runs ``func`` once more on copies:
    if it writes one in place, functx's ``ValueError`` replaces torch's error (torch's
    message is not read).
    """

    __slots__ = ("call", "copy", "leaves", "versions")

    def __init__(self, call: Call, *, copy: bool) -> None:
        self.call, self.copy = call, copy
        self.versions: list[tuple[int, ...] | None] = []
        self.leaves: list[torch.Tensor] = call.leaves

    def __enter__(self) -> list[torch.Tensor]:
        if self.copy:
            self.leaves = tracked_copies(self.call.leaves)
            if not torch.compiler.is_compiling():
                self.versions = [version(t) for t in self.leaves]
        return self.leaves

    def __exit__(self, kind: Any, err: Any, tb: Any) -> None:
        if err is None:
            if self.versions:
                for k, (t, before) in enumerate(zip(self.leaves, self.versions)):
                    if before is not None and version(t) != before:
                        raise self.call.inplace_error(k)
        elif isinstance(err, RuntimeError):
            self._raise_if_inplace(err)

    def _raise_if_inplace(self, err: RuntimeError) -> None:
        call = self.call
        if not _torch_internals.HAVE_VERSION or torch.compiler.is_compiling():
            return
        copies = tracked_copies([t.detach() for t in call.leaves])
        before = [version(t) for t in copies]
        try:
            with torch.no_grad():
                call.call_func(copies)
        except Exception:  # not an in-place write we can identify: torch's error stands
            return
        for k, (t, v) in enumerate(zip(copies, before)):
            if version(t) != v:
                raise call.inplace_error(k) from err


def torch_result(outs: Sequence[torch.Tensor], aux: Any, has_aux: bool) -> Any:
    """Pack flat outputs in torch.func's convention (the ``"torch"`` calling convention)."""
    out = outs[0] if len(outs) == 1 else tuple(outs)
    return (out, aux) if has_aux else out


def resolved(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``tensors`` with their lazy conjugate/negative bits materialized, so that every result
    of a transform can be used anywhere (``.numpy()`` refuses a tensor with the conj bit)."""
    return tuple([t.resolve_conj().resolve_neg() if isinstance(t, torch.Tensor) else t for t in tensors])


def as_leaves(out: Any) -> tuple[torch.Tensor, ...]:
    """Inverse of the packing in :func:`torch_result` (without aux)."""
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


def pack_like(leaves: Sequence[torch.Tensor], like: Any) -> Any:
    """Pack cotangents/tangents the way the matching torch.func output ``like`` was packed."""
    return leaves[0] if isinstance(like, torch.Tensor) else tuple(leaves)


def unpack(result: tuple[Any, ...], has_aux: bool) -> tuple[Any, ...]:
    """A torch.func result ``(a, b[, aux])`` as ``(a, b, aux)``, with ``aux=()`` when absent."""
    return result if has_aux else (*result, ())


def check_complex(
    leaves: Sequence[torch.Tensor], paths: Callable[[], list[str]], holomorphic: bool, what: str, api: str
) -> None:
    """``TypeError`` unless every leaf is complex (``holomorphic``) or none is (``what="output"``)."""
    for k, leaf in enumerate(leaves):
        if holomorphic and isinstance(leaf, torch.Tensor) and not leaf.is_complex():
            raise TypeError(
                f"`functx.{api}`: with holomorphic=True every differentiated {what} must be a complex "
                f"tensor, but {paths()[k]} is {describe(leaf)}."
            )
        if not holomorphic and isinstance(leaf, torch.Tensor) and leaf.is_complex():
            raise TypeError(
                f"`functx.{api}`: {paths()[k]} is {describe(leaf)}: the Jacobian of a complex output is "
                f"defined only for a holomorphic function. Pass holomorphic=True (with complex inputs) "
                f"if `func` is holomorphic; otherwise return the real and imaginary parts as real "
                f"outputs (e.g. `torch.view_as_real(out)`)."
            )


def check_scalar(out: Any, api: str, has_aux: bool = True) -> None:
    if not isinstance(out, torch.Tensor):
        hint = " `func` returned a pair: did you forget has_aux=True?" if not has_aux and _is_pair(out) else ""
        raise TypeError(f"`functx.{api}`: `func` must return a scalar tensor, got {describe(out)}.{hint}")
    if out.dim() != 0:
        raise ValueError(
            f"`functx.{api}`: `func` must return a scalar (0-dimensional) tensor, got a tensor of "
            f"shape {tuple(out.shape)}. Reduce it (e.g. `.sum()`), or use `functx.vjp`/`functx.jacrev` "
            f"for non-scalar outputs."
        )
    if not out.is_floating_point():
        raise TypeError(f"`functx.{api}`: `func` must return a real floating-point scalar, got {describe(out)}.")


def _is_pair(out: Any) -> bool:
    return isinstance(out, (tuple, list)) and len(out) == 2


def check_primals(primals: Any, name: str, api: str) -> tuple[Any, ...]:
    if not isinstance(primals, (tuple, list)):
        raise TypeError(
            f"`functx.{api}`: `{name}` must be a tuple with one entry per positional argument of "
            f"`func`, got {describe(primals)}. Wrap a single argument as `({name[:-1]},)`."
        )
    return tuple(primals)
