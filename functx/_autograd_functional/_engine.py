"""The one adapter between ``torch.autograd.functional``'s API and functx's core.

A call of :mod:`functx.autograd_functional` goes through :func:`call`, reading the API's
:class:`~functx._autograd_functional._spec.Spec`:

1. :func:`~._spec.route` picks the engine (the whole policy is there, with its reasons);
2. ``inputs``/``v`` are validated with the original's checks and messages;
3. ``func`` is wrapped in :class:`~._checks.Outputs`, which checks what it returns, exactly
   as the original does, and records whether it returned a tuple;
4. with ``strict=True`` a plain-autograd probe (``_strict``) raises the original's errors;
5. the functx core computes the result on flat tuples of tensors (``torch.func``
   underneath), under ``enable_grad`` with ``create_graph=True`` (results
   differentiable, as the original's) and under ``no_grad`` otherwise (results detached);
6. :func:`finish` undoes the tupling, as the original's ``_tuple_postprocess`` does.

If the core fails on ``func`` (a legacy ``autograd.Function`` without ``setup_context``,
``.item()`` under ``vmap``, an operation without a forward-mode formula, integer outputs,
a complex output, a tensor subclass ``torch.func`` cannot wrap, a ``func`` that writes its
inputs in place, which the core refuses in every mode...), the call is rerun with the
original algorithm, so the result, or the error, is the original's. Errors raised by the
checks are never rerun. Where the original's forward mode would write the caller's tensors,
it runs on copies (``_api``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._torch_internals import version
from ._checks import Outputs, Tensors, as_original, check_inputs, parse_v
from ._compute import FORWARD_MODE
from ._spec import Engine, Level, Spec, Strict, route
from ._strict import strict_probe

#: A write to an input that reached the caller's tensor (see :func:`_compute`).
IN_PLACE_ERROR = (
    "the function wrote one of its inputs in place, and the write reached your tensor (with "
    "`create_graph=True` an input that is a non-leaf of your graph is passed as a view, as "
    "torch.autograd.functional does); no derivative at the given point can be returned. Compute "
    "a new tensor instead of writing the input (`x * 2`, not `x.mul_(2)`)."
)


def call(
    spec: Spec,
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
    """Run the API of ``spec`` as the original would; ``fallback()`` runs the original."""
    engine = route(spec, inputs, strict, strategy)
    if engine is Engine.ORIGINAL:
        return fallback()
    is_inputs_tuple, xs = check_inputs(spec, inputs)
    vs = parse_v(spec, v, xs, is_inputs_tuple) if spec.takes_v else None
    fn = Outputs(spec, func)
    try:
        if engine is Engine.VHP:
            return torch.autograd.functional.vhp(fn, inputs, v, create_graph, False)
        if strict and spec.strict is not Strict.ORIGINAL:
            strict_probe(spec, func, xs, create_graph, vectorize)
        result = _compute(spec, fn, xs, vs, create_graph, strategy)
    except Exception as err:
        if getattr(err, "_functx_compat", False):
            raise
        return fallback()
    return finish(spec, result, fn.is_tuple, is_inputs_tuple, lists=strategy == FORWARD_MODE)


def _compute(spec: Spec, fn: Outputs, xs: Tensors, vs: Tensors | None, create_graph: bool, strategy: str) -> Any:
    """The functx result. A ``func`` that writes one of its inputs in place is refused by
    the core in every mode (its forward mode runs on copies), and the call reruns the
    original, which raises its own error (or, in its forward mode, runs on copies). A
    write that reaches the caller's tensor all the same (through the view that
    ``create_graph=True`` passes for a non-leaf input, as the original does) raises."""
    assert spec.compute is not None
    with torch.enable_grad() if create_graph else torch.no_grad():
        prepared = prepare(xs, create_graph)
        before = [version(p) for p in prepared]
        tangents = prepare_v(vs, xs, create_graph) if spec.takes_v else None
        try:
            result = spec.compute(fn, prepared, tangents, strategy)
        finally:
            _check_unwritten(spec, prepared, before)
    return result if create_graph else detach(result)


def _check_unwritten(spec: Spec, prepared: Tensors, before: list[Any]) -> None:
    """``prepared`` share the caller's version counters: a change means the caller's tensor
    was written (once; the original must not run again and write it a second time)."""
    if any(version(p) != v for p, v in zip(prepared, before)):
        raise as_original(RuntimeError(f"`functx.autograd_functional.{spec.name}`: {IN_PLACE_ERROR}"))


def prepare(xs: Tensors, create_graph: bool) -> Tensors:
    """New tensor objects for ``func``, never the user's (the original's ``_grad_preprocess``):
    with ``create_graph=True`` connected to the user's graph, or detached (results
    differentiable, as the original's, even under ``no_grad``)."""
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


def detach(result: Any) -> Any:
    if isinstance(result, torch.Tensor):
        return result.detach()
    return tuple(detach(r) for r in result)


def finish(spec: Spec, result: Any, is_outputs_tuple: bool, is_inputs_tuple: bool, *, lists: bool) -> Any:
    """Undo the tupling: the original's ``_tuple_postprocess``. The original's forward mode
    (``lists=True``) returns lists where the input level is kept, and so does this."""
    keep = tuple(is_outputs_tuple if level is Level.OUTPUTS else is_inputs_tuple for level in spec.levels)
    if spec.pair:
        out, product = result
        return unpack(out, (is_outputs_tuple,)), unpack(product, keep)
    result = unpack(result, keep)
    if not (spec.forward_lists and lists and is_inputs_tuple):
        return result
    return [list(row) for row in result] if keep[0] else list(result)


def unpack(result: Any, keep: tuple[bool, ...]) -> Any:
    """Unwrap the one-element tuples of nesting levels whose ``keep`` flag is False."""
    if not keep:
        return result
    inner = tuple(unpack(r, keep[1:]) for r in result)
    return inner if keep[0] else inner[0]
