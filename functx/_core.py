"""The small core every transform is built on.

A transform call goes through the same few steps:

1. validate the transform's options once, when the transform is created
   (:func:`check_callable`, :func:`check_argnums`, :func:`check_bool`, :func:`check_chunk_size`);
2. at call time build a :class:`Call`: resolve ``argnums``, select the differentiated
   arguments, flatten them to tensor leaves with optree and validate those leaves;
3. hand ``Call.flat_fn`` (a function of flat tensors returning flat tensors) to a
   ``torch.func`` primitive;
4. rebuild pytrees with the ``Call``'s stored structures.

``Call.flat_fn`` records the output structure and any non-tensor ``aux`` values on the
``Call`` itself while it runs (a side channel that also traces under ``torch.compile``),
so ``aux`` may hold arbitrary Python objects and only tensors cross into ``torch.func``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import _torch_internals
from ._torch_internals import is_exporting, lift, transforms_active, version
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


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


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
    return all(t is None or type(t) in _PLAIN_TENSORS for t in tensors)


def plain_autograd(*tensors: torch.Tensor) -> bool:
    """Whether plain ``torch.autograd.grad`` computes what ``torch.func`` would: plain eager
    mode, outside inference mode, and no tensor is part of an outer autograd graph (then
    ``torch.func``'s results would be differentiable with respect to it)."""
    return plain_eager(*tensors) and not torch.is_inference_mode_enabled() and not any(t.requires_grad for t in tensors)


def reaches_other_leaves(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> bool:
    """Whether the autograd graph of ``outputs`` reaches a tensor requiring grad other than
    ``inputs`` (a tensor ``func`` captured, such as model weights or a meta-learned rate).

    ``torch.func`` keeps its results differentiable with respect to such tensors; the plain
    autograd paths then keep their graph too (``create_graph=True``) instead of detaching.
    """
    ours = {id(x) for x in inputs}
    stack = [out.grad_fn for out in outputs if out.grad_fn is not None]
    if any(out.requires_grad and out.grad_fn is None and id(out) not in ours for out in outputs):
        return True
    seen = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)  # AccumulateGrad: a leaf tensor requiring grad
        if leaf is not None:
            if id(leaf) not in ours:
                return True
            continue
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)
    return False


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
    grads = torch.autograd.grad(
        [outputs[k] for k in keep],
        inputs,
        None if grad_outputs is None else [grad_outputs[k] for k in keep],
        create_graph=create_graph,
        retain_graph=retain_graph,
        allow_unused=True,
        is_grads_batched=is_grads_batched,
    )
    return tuple(_zeros(x, batch) if g is None else g for g, x in zip(grads, inputs))


def _zeros(x: torch.Tensor, batch: tuple[int, ...]) -> torch.Tensor:
    return x.new_zeros(batch + x.shape) if batch else torch.zeros_like(x)


# --------------------------------------------------------------------------------------
# One call of a transform.


class Call:
    """Bookkeeping for one call of a transform.

    ``argnums=None`` means "all positional arguments, as a tuple" (``vjp``/``jvp`` style);
    an int selects one argument (its pytree is the differentiated structure); a tuple
    selects several (a tuple of their pytrees).
    """

    __slots__ = (
        "_versions",
        "api",
        "argnums",
        "args",
        "aux_spec",
        "aux_static",
        "func",
        "has_aux",
        "holomorphic",
        "in_spec",
        "kwargs",
        "leaves",
        "out_spec",
        "roots",
    )

    def __init__(
        self,
        api: str,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        argnums: int | tuple[int, ...] | None,
        has_aux: bool,
        roots: Sequence[str] | None = None,
    ) -> None:
        self.api, self.func, self.args, self.kwargs, self.has_aux = api, func, args, kwargs, has_aux
        self.roots = roots
        if argnums is None:
            selected: Any = args
        else:
            argnums = resolve_argnums(argnums, len(args), api)
            selected = args[argnums] if isinstance(argnums, int) else tuple(args[i] for i in argnums)
        self.argnums = argnums
        self.leaves, self.in_spec = tree_flatten(selected)
        if not all(map(is_differentiable, self.leaves)):
            check_float_leaves(self.leaves, self.input_paths, api=api, what="differentiated input ")
        self._versions: list[tuple[int, ...] | None] = []
        self.holomorphic: bool | None = None  # None: complex outputs are not checked (vjp, jvp)
        self.out_spec: TreeSpec = _UNSET  # recorded by `flat_fn` while `func` runs
        self.aux_spec: TreeSpec = _UNSET
        self.aux_static: list[Any] = []

    # -- naming, for errors -----------------------------------------------------------
    def _selected_indices(self) -> tuple[int, ...]:
        if self.argnums is None:
            return all_argnums(len(self.args))
        return (self.argnums,) if isinstance(self.argnums, int) else self.argnums

    def _root(self, i: int) -> str:
        if self.roots is not None:
            return f"{self.roots[0]}[{i}]"
        return arg_root(self.func, i)

    def input_paths(self) -> list[str]:
        """Key paths of the differentiated leaves, e.g. ``["params['w']", "x"]``."""
        return [p for i in self._selected_indices() for p in leaf_paths(self.args[i], self._root(i))]

    def require_leaves(self, name: str) -> None:
        """``ValueError`` when there is nothing to differentiate (forward mode needs a tangent)."""
        if not self.leaves:
            raise ValueError(
                f"`functx.{self.api}`: `{name}` must contain at least one floating-point or complex "
                f"tensor to differentiate with respect to, got {self.args!r}."
            )

    def set_holomorphic(self, holomorphic: bool) -> None:
        """Apply the complex-number rule of ``jacrev``/``jacfwd``/``hessian`` (JAX's): with
        ``holomorphic`` every differentiated input and every output must be complex; without,
        outputs must be real (complex inputs are fine: see the ``_jacobian`` module doc)."""
        self.holomorphic = holomorphic
        if holomorphic:
            check_complex(self.leaves, self.input_paths, True, "input", self.api)

    # -- the function torch.func sees -------------------------------------------------
    def call_func(self, leaves: Sequence[torch.Tensor]) -> Any:
        selected = tree_unflatten(self.in_spec, leaves)
        argnums = self.argnums
        if argnums is None:
            return self.func(*selected, **self.kwargs)
        lifted = len(self.args) > 1 and not torch.compiler.is_compiling() and transforms_active()
        args = self.lifted_args() if lifted else list(self.args)
        if isinstance(argnums, int):
            args[argnums] = selected
        else:
            for i, sub in zip(argnums, selected):
                args[i] = sub
        return self.func(*args, **self.kwargs)

    # -- the two kinds of argument ----------------------------------------------------
    # A differentiated input is never changed: an in-place write to it raises, in every
    # mode. A non-differentiated positional argument belongs to `func`, which may write it
    # in place as under torch.func (it is wrapped at the running transform's level).

    def lifted_args(self) -> list[Any]:
        """The positional arguments with the tensors of the non-differentiated ones wrapped at
        the level of the innermost running transform (see ``_torch_internals.lift``)."""
        args = list(self.args)
        chosen = self._selected_indices()
        for i, arg in enumerate(args):
            if i not in chosen:
                leaves, spec = tree_flatten(arg)
                if any(isinstance(t, torch.Tensor) for t in leaves):
                    args[i] = tree_unflatten(spec, lift(leaves))
        return args

    def static_tensors(self) -> list[torch.Tensor]:
        """The tensors in the non-differentiated positional arguments."""
        if self.argnums is None or len(self.args) == 1:
            return []
        chosen = self._selected_indices()
        leaves = [leaf for i, arg in enumerate(self.args) if i not in chosen for leaf in tree_flatten(arg)[0]]
        return [t for t in leaves if isinstance(t, torch.Tensor)]

    def fresh_leaves(self) -> list[torch.Tensor]:
        """Copies of the differentiated leaves for the forward-mode paths, where torch would
        let `func` write the caller's tensors; :meth:`check_unwritten` checks them after."""
        fresh = [t.clone() for t in self.leaves]
        if not torch.compiler.is_compiling():  # compiled: the copies still protect the caller
            self._versions = [version(t) for t in fresh]
        return fresh

    def check_unwritten(self, fresh: Sequence[torch.Tensor]) -> None:
        if torch.compiler.is_compiling():  # the copies still protect the caller's tensors
            return
        for k, (t, before) in enumerate(zip(fresh, self._versions)):
            if before is not None and version(t) != before:
                raise self._inplace_error(k)

    def raise_if_inplace(self, err: RuntimeError) -> None:
        """After a ``RuntimeError`` in a reverse-mode path (torch refuses in-place writes to
        the inputs it differentiates): run `func` once more on copies of the inputs, and if
        it writes one in place, raise functx's error instead. torch's message is not read."""
        if not _torch_internals.HAVE_VERSION or torch.compiler.is_compiling():
            return
        copies = [t.detach().clone() for t in self.leaves]
        before = [version(t) for t in copies]
        try:
            with torch.no_grad():
                self.call_func(copies)
        except Exception:  # not an in-place write we can identify: torch's error stands
            return
        for k, (t, v) in enumerate(zip(copies, before)):
            if version(t) != v:
                raise self._inplace_error(k) from err

    def _inplace_error(self, k: int) -> ValueError:
        return ValueError(
            f"`functx.{self.api}`: `func` writes in place to its differentiated input {self.input_paths()[k]} "
            f"(for example `x.mul_(2)`, `x += 1` or `x[0] = 0`). functx never changes the tensors it "
            f"differentiates, in any mode: compute a new tensor instead (`x = x * 2`), or pass the tensor "
            f"in an argument not listed in `argnums` (those belong to `func`, which may write them)."
        )

    # Four calling conventions of `func` for torch.func, kept because each pays for itself
    # (measured side by side on one Call, benchmarks/bench_core.py rows in brackets):
    # * flat_fn   ((outputs,), (aux,)): the one that records structures; used where several
    #             outputs and aux must be kept apart (linearize, the empty-input paths);
    # * torch_fn  bare tensor, aux only with has_aux: ~13% faster than flat_fn with has_aux=True
    #             on the Jacobian engine [jacrev/jacfwd R^256, hessian R^256, per-sample Hessians];
    # * scalar_fn (scalar, aux): the plain-autograd gradient and hvp [grad overhead, hvp MLP];
    # * scalar_fn_no_aux: ~7% faster than scalar_fn with has_aux=True, and ~45% faster than
    #             torch_fn (no optree flatten of the output) on torch.func's gradient, the
    #             nested path [per-sample gradients].
    def flat_fn(self, *leaves: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """``func`` as a function of flat tensors: returns ``(output_leaves, aux_tensors)``."""
        out, aux_tensors = self._split_aux(self.call_func(leaves))
        out_leaves, self.out_spec = tree_flatten(out)
        if not out_leaves:
            raise ValueError(f"`functx.{self.api}`: `func` returned no tensors to differentiate (got {out!r}).")
        if self.holomorphic is not None:
            check_complex(out_leaves, lambda: leaf_paths(out, "output"), self.holomorphic, "output", self.api)
        if not all(map(is_differentiable, out_leaves)):
            check_float_leaves(out_leaves, lambda: leaf_paths(out, "output"), api=self.api, hint=self._aux_hint(out))
        return tuple(out_leaves), aux_tensors

    def torch_fn(self, *leaves: torch.Tensor) -> Any:
        """``func`` in torch.func's own convention: flat tensors in; one tensor (or a tuple for
        several outputs) out, paired with the aux tensors only when ``has_aux``.

        Bare tensors and no aux spare torch.func's Python pytree work on every call.
        """
        return torch_result(*self.flat_fn(*leaves), self.has_aux)

    def scalar_fn(self, *leaves: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Like :meth:`flat_fn` for a function that must return a real scalar tensor."""
        out, aux_tensors = self._split_aux(self.call_func(leaves))
        check_scalar(out, self.api, self.has_aux)
        return out, aux_tensors

    def scalar_fn_no_aux(self, *leaves: torch.Tensor) -> torch.Tensor:
        """:meth:`scalar_fn` for ``has_aux=False``: returns the scalar alone."""
        out = self.call_func(leaves)
        check_scalar(out, self.api, self.has_aux)
        return out

    def _aux_hint(self, out: Any) -> str:
        if not self.has_aux and _is_pair(out):
            return "`func` returned a pair: did you forget has_aux=True?"
        return "Every output of `func` is differentiated; return other values as `aux` (has_aux=True)."

    def _split_aux(self, result: Any) -> tuple[Any, tuple[torch.Tensor, ...]]:
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
        aux_leaves, self.aux_spec = tree_flatten(aux)
        self.aux_static = [None if isinstance(a, torch.Tensor) else a for a in aux_leaves]
        return out, tuple(a for a in aux_leaves if isinstance(a, torch.Tensor))

    # -- rebuilding -------------------------------------------------------------------
    def unflatten_in(self, leaves: Sequence[Any]) -> PyTree:
        return tree_unflatten(self.in_spec, leaves)

    def unflatten_out(self, leaves: Sequence[Any]) -> PyTree:
        return tree_unflatten(self.out_spec, leaves)

    def aux(self, aux_tensors: Sequence[torch.Tensor]) -> PyTree:
        tensors = iter(aux_tensors)
        return tree_unflatten(self.aux_spec, [next(tensors) if a is None else a for a in self.aux_static])

    def with_aux(self, result: Any, aux_tensors: Sequence[torch.Tensor]) -> Any:
        """``result`` or ``(result, aux)`` depending on ``has_aux``."""
        return (result, self.aux(aux_tensors)) if self.has_aux else result


def torch_result(outs: Sequence[torch.Tensor], aux: Any, has_aux: bool) -> Any:
    """Pack flat outputs in torch.func's convention (see :meth:`Call.torch_fn`)."""
    out = outs[0] if len(outs) == 1 else tuple(outs)
    return (out, aux) if has_aux else out


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
