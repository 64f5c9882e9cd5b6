"""The one adapter between ``torch.autograd.functional``'s API and functx's core.

A call of :mod:`functx.autograd_functional` goes through :func:`call`:

1. :func:`route` picks the engine (the whole policy is there, with its measurements);
2. ``inputs``/``v`` are validated with the original's checks and messages;
3. ``func`` is wrapped in :class:`Outputs`, which checks what it returns, exactly as the
   original does, and records whether it returned a tuple;
4. with ``strict=True`` a plain-autograd :func:`strict_probe` raises the original's errors;
5. the functx core computes the result on flat tuples of tensors (``torch.func`` underneath),
   under ``enable_grad`` with ``create_graph=True`` (results differentiable, as the
   original's) and under ``no_grad`` otherwise (results detached);
6. :func:`unpack` undoes the tupling, as the original's ``_tuple_postprocess`` does.

If the core fails on ``func`` (a legacy ``autograd.Function`` without ``setup_context``,
``.item()`` under ``vmap``, an operation without a forward-mode formula, integer outputs,
a tensor subclass ``torch.func`` cannot wrap...), the call is rerun with the original
algorithm, so the result, or the error, is the original's. Errors raised by the checks of
this module are never rerun.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.functional as original

from ._core import all_argnums
from ._hessian import hessian as core_hessian
from ._jacobian import jacfwd, jacrev
from ._vjp_jvp import jvp as core_jvp

Tensors = tuple[torch.Tensor, ...]

#: ``jvp`` with fewer input elements than this runs the original double-backward trick:
#: below it ``torch.func``'s per-call overhead (about 50 us plus a few us per operation
#: on CPU) costs more than forward mode saves (measured crossover: 2**12 to 2**14
#: elements for elementwise functions; above it forward mode is up to 2x faster).
JVP_FORWARD_MODE_MIN_NUMEL = 2**14

STRATEGIES = ("forward-mode", "reverse-mode")


# --------------------------------------------------------------------------------------
# The policy.


def route(api: str, inputs: Any, strict: bool, strategy: str = "reverse-mode") -> str:
    """The engine for one call: ``"original"``, ``"vhp"`` or ``"functx"``.

    * ``vjp`` and ``vhp``: ``"original"``. One backward pass (two for ``vhp``) is already
      the optimal algorithm; ``torch.func`` only adds per-call overhead (1.3x to 3x
      slower measured), so the original runs unchanged.
    * ``hvp``: ``"vhp"``, the reverse-over-reverse product (the original ``vhp``'s
      algorithm, with ``hvp``'s checks and messages) instead of the double-backward trick:
      the same numbers for every function whose Hessian is symmetric, 2x faster.
      With ``strict=True``: ``"original"``, whose checks belong to the trick.
    * ``jvp``: ``"functx"`` forward mode for inputs of at least
      :data:`JVP_FORWARD_MODE_MIN_NUMEL` elements, ``"original"`` below it and with
      ``strict=True`` (its checks belong to the double-backward trick).
    * ``jacobian`` and ``hessian``: ``"functx"`` always, whatever ``vectorize`` says
      (both give the same numbers); ``strict=True`` adds the plain-autograd
      :func:`strict_probe` before it. ``strict=True`` with forward mode: ``"original"``,
      which refuses the combination with its own error.
    """
    if api in ("vjp", "vhp") or (strict and strategy == "forward-mode"):
        return "original"
    if api in ("jvp", "hvp") and strict:
        return "original"
    if api == "hvp":
        return "vhp"
    if api == "jvp" and _numel(inputs) < JVP_FORWARD_MODE_MIN_NUMEL:
        return "original"
    return "functx"


def _numel(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.numel()
    if isinstance(inputs, tuple):
        return sum(x.numel() for x in inputs if isinstance(x, torch.Tensor))
    return 0  # invalid: the original raises its error


# --------------------------------------------------------------------------------------
# The adapter.


def call(
    api: str,
    func: Callable[..., Any],
    inputs: Any,
    v: Any,
    create_graph: bool,
    strict: bool,
    fallback: Callable[[], Any],
    *,
    vectorize: bool = False,
    strategy: str = "reverse-mode",
) -> Any:
    """Run ``api`` (``"jvp"``, ``"hvp"``, ``"jacobian"`` or ``"hessian"``) as the original
    would; ``fallback()`` runs the original itself."""
    engine = route(api, inputs, strict, strategy)
    if engine == "original":
        return fallback()
    is_inputs_tuple, xs = as_tuple(inputs, "inputs", api)
    for x in xs:
        if not (x.is_floating_point() or x.is_complex()):
            x.detach().requires_grad_(True)  # torch's own error, as the original raises it
    vs = parse_v(api, v, xs, is_inputs_tuple) if api in ("jvp", "hvp") else None
    fn = Outputs(api, func, scalar=api in ("hvp", "hessian"))
    if engine == "vhp":
        return original.vhp(fn, inputs, v, create_graph, False)
    if strict:
        strict_probe(Outputs(api, func, scalar=api == "hessian", strict=True), xs, create_graph, vectorize, api)
    try:
        with torch.enable_grad() if create_graph else torch.no_grad():
            tangents = prepare_v(vs, xs, create_graph) if api == "jvp" else None
            result = COMPUTE[api](fn, prepare(xs, create_graph), tangents, strategy)
    except Exception as err:
        if getattr(err, "_functx_compat", False):
            raise
        return fallback()
    if not create_graph:
        result = detach(result)
    return finish(api, result, fn.is_tuple, is_inputs_tuple, lists=strategy == "forward-mode")


def _jvp(fn: Callable[..., Any], xs: Tensors, vs: Tensors, strategy: str) -> Any:
    return core_jvp(fn, xs, vs)


def _jacobian(fn: Callable[..., Any], xs: Tensors, vs: None, strategy: str) -> Any:
    transform = jacrev if strategy == "reverse-mode" else jacfwd
    return transform(fn, argnums=all_argnums(len(xs)))(*xs)


def _hessian(fn: Callable[..., Any], xs: Tensors, vs: None, strategy: str) -> Any:
    mode = "rev-rev" if strategy == "reverse-mode" else "fwd-rev"
    return core_hessian(fn, argnums=all_argnums(len(xs)), mode=mode)(*xs)


COMPUTE = {"jvp": _jvp, "jacobian": _jacobian, "hessian": _hessian}


def finish(api: str, result: Any, is_outputs_tuple: bool, is_inputs_tuple: bool, *, lists: bool) -> Any:
    """Undo the tupling: the original's ``_tuple_postprocess``. The original's forward mode
    (``lists=True``) returns lists where the input level is kept, and so does this."""
    if api == "jvp":
        out, tangents = result
        return unpack(out, (is_outputs_tuple,)), unpack(tangents, (is_outputs_tuple,))
    keep_outer = is_outputs_tuple if api == "jacobian" else is_inputs_tuple
    result = unpack(result, (keep_outer, is_inputs_tuple))
    if not (lists and is_inputs_tuple):
        return result
    return [list(row) for row in result] if keep_outer else list(result)


def unpack(result: Any, keep: tuple[bool, ...]) -> Any:
    """Unwrap the one-element tuples of nesting levels whose ``keep`` flag is False."""
    if not keep:
        return result
    inner = tuple(unpack(r, keep[1:]) for r in result)
    return inner if keep[0] else inner[0]


def detach(result: Any) -> Any:
    if isinstance(result, torch.Tensor):
        return result.detach()
    return tuple(detach(r) for r in result)


def prepare(xs: Tensors, create_graph: bool) -> Tensors:
    """New tensor objects for ``func``, never the user's (the original's ``_grad_preprocess``):
    with ``create_graph=True`` connected to the user's graph, or fresh leaves that require
    grad (so that results are differentiable, as the original's, even under ``no_grad``)."""
    if not create_graph:
        return tuple(x.detach() for x in xs)
    return tuple(x.view_as(x) if x.requires_grad else x.detach().requires_grad_(True) for x in xs)


def prepare_v(vs: Tensors | None, xs: Tensors, create_graph: bool) -> Tensors:
    """``v`` shaped like the inputs; ``None`` (single-element inputs) means ones. Cast to the
    inputs' dtypes, as autograd casts the original's ``grad_outputs``."""
    if vs is None:
        return tuple(torch.ones_like(x) for x in xs)
    vs = vs if create_graph else tuple(t.detach() for t in vs)
    return tuple(t if t.dtype == x.dtype else t.to(x.dtype) for t, x in zip(vs, xs))


# --------------------------------------------------------------------------------------
# The original's checks, with its exception types and messages (user code matches them).


def fail(err: Exception) -> Exception:
    """Mark an error of this module's checks so that :func:`call` raises it as it is."""
    err._functx_compat = True  # type: ignore[attr-defined]
    return err


def as_tuple(value: Any, name: str, api: str) -> tuple[bool, tuple[Any, ...]]:
    """``(was_tuple, value_as_tuple)``; every entry must be a Tensor."""
    is_tuple = isinstance(value, tuple)
    values = value if is_tuple else (value,)
    for i, entry in enumerate(values):
        if not isinstance(entry, torch.Tensor):
            where = f"value at index {i}" if is_tuple else f"given {name}"
            raise fail(
                TypeError(
                    f"The {name} given to {api} must be either a Tensor or a tuple of Tensors but the"
                    f" {where} has type {type(entry)}."
                )
            )
    return is_tuple, values


def parse_v(api: str, v: Any, refs: Tensors, is_refs_tuple: bool) -> Tensors | None:
    """Validate ``v`` against the inputs ``refs`` (``jvp``, ``hvp``)."""
    if v is None:
        if len(refs) != 1 or refs[0].nelement() != 1:
            raise fail(
                RuntimeError(
                    "The vector v can only be None if the input to the user-provided function "
                    "is a single Tensor with a single element."
                )
            )
        return None
    _, vs = as_tuple(v, "v", api)
    if len(vs) != len(refs):
        if is_refs_tuple:
            raise fail(RuntimeError(f"v is a tuple of invalid length: should be {len(refs)} but got {len(vs)}."))
        raise fail(RuntimeError("The given v should contain a single Tensor."))
    for i, (t, ref) in enumerate(zip(vs, refs)):
        if t.size() != ref.size():
            entry = f"Entry {i} in " if is_refs_tuple else ""
            raise fail(RuntimeError(f"{entry}v has invalid size: should be {ref.size()} but got {t.size()}."))
    return vs


class Outputs:
    """``func`` returning a tuple of Tensors, or one scalar for ``scalar=True``
    (``hessian``, ``hvp``), after the original's checks of what it returns."""

    def __init__(self, api: str, func: Callable[..., Any], *, scalar: bool, strict: bool = False) -> None:
        self.api, self.func, self.scalar, self.strict = api, func, scalar, strict
        self.is_tuple = False

    def __call__(self, *xs: torch.Tensor) -> Any:
        out = self.func(*xs)
        self.is_tuple, outs = as_tuple(out, "outputs of the user-provided function", self.api)
        if self.strict:
            for i, o in enumerate(outs):
                if not o.requires_grad:
                    raise fail(
                        RuntimeError(
                            f"Output {i} of the user-provided function does not require gradients."
                            " The outputs must be computed in a differentiable manner from the input"
                            " when running in strict mode."
                        )
                    )
        if not self.scalar:
            return outs
        if self.is_tuple:
            raise fail(RuntimeError(f"The function given to {self.api} should return a single Tensor"))
        if out.nelement() != 1:
            raise fail(
                RuntimeError(f"The Tensor returned by the function given to {self.api} should contain a single element")
            )
        return out if self.api == "hvp" else out.reshape(())


# --------------------------------------------------------------------------------------
# strict=True: graph connectivity, which only plain autograd can see.


def strict_probe(fn: Outputs, xs: Tensors, create_graph: bool, vectorize: bool, api: str) -> None:
    """Raise the error the original ``jacobian``/``hessian`` raises with ``strict=True``.

    The original checks every Jacobian row; connectivity and ``requires_grad`` are the
    same for every element of an output (its backward runs through the same graph), so one
    row per output suffices: one forward and one backward per output (per input for
    ``hessian``), against the original's one backward per output element.
    """
    with torch.enable_grad():
        leaves = tuple(x.detach().requires_grad_(True) for x in xs)
        outs = _strict_gradient(fn, leaves) if api == "hessian" else fn(*leaves)
        if vectorize:
            raise fail(
                RuntimeError(
                    "torch.autograd.functional.jacobian: `strict=True` and `vectorized=True` are not "
                    "supported together. Please either set `strict=False` or `vectorize=False`."
                )
            )
        for i, out in enumerate(outs):
            if out.nelement() == 0:
                continue
            grads = torch.autograd.grad(
                out.reshape(-1)[0], leaves, retain_graph=True, create_graph=create_graph, allow_unused=True
            )
            for j, g in enumerate(grads):
                if g is None:
                    raise fail(
                        RuntimeError(
                            f"Output {i} of the user-provided function is independent of input {j}. "
                            "This is not allowed in strict mode."
                        )
                    )
                if create_graph and not g.requires_grad:
                    raise fail(
                        RuntimeError(  # the original names the output index here
                            f"The jacobian of the user-provided function is independent of input {i}. "
                            "This is not allowed in strict mode when create_graph=True."
                        )
                    )


def _strict_gradient(fn: Outputs, leaves: Tensors) -> Tensors:
    """The original ``hessian``'s inner Jacobian (the gradient) and its strict check."""
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, create_graph=True, allow_unused=True)
    jac = tuple(torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads))
    for i, g in enumerate(jac):
        if not g.requires_grad:
            raise fail(
                RuntimeError(
                    "While computing the hessian, found that the jacobian of the user-provided"
                    f" function with respect to input {i} is independent of the input. This is not"
                    " allowed in strict mode. You should ensure that your function is twice"
                    " differentiable and that the jacobian depends on the inputs (this would be"
                    " violated by a linear function for example)."
                )
            )
    return jac


def check_strategy(strategy: Any, api: str) -> None:
    """The original's check of ``strategy`` (``jacobian``, with a hint) and
    ``outer_jacobian_strategy`` (``hessian``)."""
    if strategy not in STRATEGIES:
        hint = (
            ' Hint: If your function has more outputs than inputs, "forward-mode" tends to be more '
            'performant. Otherwise, prefer to use "reverse-mode".'
        )
        raise AssertionError(
            'Expected strategy to be either "forward-mode" or "reverse-mode".' + (hint if api == "jacobian" else "")
        )
