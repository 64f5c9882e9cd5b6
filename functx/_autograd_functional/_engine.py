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
   differentiable, as the original's) and under ``no_grad`` otherwise (results detached),
   on copies of the inputs: a ``func`` that writes its inputs in place gets the
   original's error, and the caller's tensors are never written;
6. :func:`finish` undoes the tupling, as the original's ``_tuple_postprocess`` does.

If the core fails on ``func`` (a legacy ``autograd.Function`` without ``setup_context``,
``.item()`` under ``vmap``, an operation without a forward-mode formula, integer outputs,
a complex output, a tensor subclass ``torch.func`` cannot wrap...), the call is rerun with
the original algorithm, so the result, or the error, is the original's. Errors raised by
the checks are never rerun.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._checks import Outputs, Tensors, check_inputs, fail, parse_v
from ._spec import FORWARD_MODE, Engine, Level, Spec, Strict, route
from ._strict import strict_probe

#: Autograd's error for an in-place write to an input of the original (its inputs are
#: leaves that require grad), raised where the original itself would not refuse the write
#: (forward mode, which it refuses without ``vectorize=True`` and lets write the caller's
#: tensor with it).
IN_PLACE_ERROR = "a leaf Variable that requires grad is being used in an in-place operation."


#: With ``create_graph=True`` an input that is a non-leaf of the user's graph reaches
#: ``func`` as a view (as in the original), and autograd lets a write through: the
#: caller's tensor is written, as by the original, and the derivative the original
#: returns then is not the function's (it differentiates at the written point), so
#: functx refuses to return one.
IN_PLACE_VIEW_ERROR = (
    "the function wrote one of its inputs in place. With `create_graph=True` an input that is "
    "a non-leaf of your graph reaches the function as a view, so the write went through to your "
    "tensor (as in torch.autograd.functional), and no derivative of the function at the given "
    "point can be returned. Compute a new tensor instead of writing the input (`x * 2`, not "
    "`x.mul_(2)`)."
)


class InPlaceWrite(Exception):
    """``func`` wrote one of its inputs in place (seen on the copies' version counters)."""


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
    except InPlaceWrite:
        if create_graph:  # a non-leaf input of the user's graph, written as the original lets it
            raise fail(RuntimeError(f"`functx.autograd_functional.{spec.name}`: {IN_PLACE_VIEW_ERROR}")) from None
        if strategy == FORWARD_MODE:
            raise fail(RuntimeError(IN_PLACE_ERROR)) from None
        return fallback()  # the original refuses the write before making it, with its message
    except Exception as err:
        if getattr(err, "_functx_compat", False):
            raise
        return fallback()
    return finish(spec, result, fn.is_tuple, is_inputs_tuple, lists=strategy == FORWARD_MODE)


def _compute(spec: Spec, fn: Outputs, xs: Tensors, vs: Tensors | None, create_graph: bool, strategy: str) -> Any:
    """The functx result; :class:`InPlaceWrite` if ``func`` wrote one of its inputs."""
    assert spec.compute is not None
    with torch.enable_grad() if create_graph else torch.no_grad():
        prepared = prepare(xs, create_graph)
        before = [p._version for p in prepared]
        tangents = prepare_v(vs, xs, create_graph) if spec.takes_v else None
        try:
            result = spec.compute(fn, prepared, tangents, strategy)
        except Exception as err:
            _check_unwritten(prepared, before, err)
            raise
    _check_unwritten(prepared, before, None)
    return result if create_graph else detach(result)


def _check_unwritten(prepared: Tensors, before: list[int], err: Exception | None) -> None:
    """Raise :class:`InPlaceWrite` if ``func`` wrote one of ``prepared`` (also when the
    computation failed after the write: the original must not run again then)."""
    if any(p._version != v for p, v in zip(prepared, before)):
        raise InPlaceWrite from err


def prepare(xs: Tensors, create_graph: bool) -> Tensors:
    """New tensor objects for ``func``, never the user's (the original's ``_grad_preprocess``):
    with ``create_graph=True`` connected to the user's graph (an in-place write to a leaf
    raises autograd's error, as in the original); otherwise fresh copies, so that an
    in-place write (which ``torch.func``'s forward mode would let through) lands in the
    copy, is seen by its version counter and raises the original's error."""
    if not create_graph:
        return tuple(x.detach().clone() for x in xs)
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
