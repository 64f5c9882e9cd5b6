"""``vjp``, ``jvp`` and ``linearize``: the two primitive products on pytrees."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, overload

import torch

from . import _torch_internals as internals
from ._core import (
    Call,
    InplaceGuard,
    as_leaves,
    check_bool,
    check_callable,
    check_primals,
    pack_like,
    resolved,
    tracked_copies,
    unpack,
)
from ._tree import PyTree, TensorTree, flatten_like


@overload
def vjp(
    func: Callable[..., Any], *primals: Any, has_aux: Literal[False] = ...
) -> tuple[TensorTree, Callable[[TensorTree], tuple[TensorTree, ...]]]: ...
@overload
def vjp(
    func: Callable[..., Any], *primals: Any, has_aux: Literal[True]
) -> tuple[TensorTree, Callable[[TensorTree], tuple[TensorTree, ...]], PyTree]: ...


def vjp(func: Callable[..., Any], *primals: Any, has_aux: bool = False) -> tuple[Any, ...]:
    """Evaluate ``func`` at ``primals`` and return its vector-Jacobian product function.

    Args:
        func: a function of the positional ``primals`` returning a pytree of
            floating-point tensors (or ``(output, aux)`` when ``has_aux=True``).
        *primals: the point, one pytree of floating-point tensors per positional argument.
        has_aux: whether ``func`` returns ``(output, aux)``. (default: ``False``)

    Returns:
        ``(output, vjp_fn)``, or ``(output, vjp_fn, aux)`` when ``has_aux=True``.
        ``vjp_fn(cotangents)`` takes a pytree shaped like ``output`` and returns a tuple
        with one cotangent pytree per primal. It may be called many times and composes
        with :func:`functx.vmap`.

    Example:
        >>> import torch, functx
        >>> out, vjp_fn = functx.vjp(lambda x, y: {"s": x * y}, torch.tensor(2.0), torch.tensor(3.0))
        >>> vjp_fn({"s": torch.tensor(1.0)})
        (tensor(3.), tensor(2.))
    """
    check_callable(func, "func", "vjp")
    check_bool(has_aux, "has_aux", "vjp")
    call = Call("vjp", func, primals, {}, None, has_aux, roots=("primals",))
    torch_fn, outputs = call.fn("torch")
    with InplaceGuard(call, copy=False) as leaves:
        out, pullback, aux = unpack(torch.func.vjp(torch_fn, *leaves, has_aux=has_aux), has_aux)
    outs = as_leaves(out)

    def vjp_fn(cotangents: Any) -> tuple[Any, ...]:
        flat = flatten_like(cotangents, outputs.spec, outs, name="cotangents", api="vjp", ref="the outputs")
        return call.unflatten_in(resolved(pullback(pack_like(flat, out))))

    result = (outputs.unflatten(outs), vjp_fn)
    return result + (outputs.aux(aux),) if has_aux else result


@overload
def jvp(
    func: Callable[..., Any], primals: Any, tangents: Any, has_aux: Literal[False] = ...
) -> tuple[TensorTree, TensorTree]: ...
@overload
def jvp(
    func: Callable[..., Any], primals: Any, tangents: Any, has_aux: Literal[True]
) -> tuple[TensorTree, TensorTree, PyTree]: ...


def jvp(func: Callable[..., Any], primals: Any, tangents: Any, has_aux: bool = False) -> tuple[Any, ...]:
    """Jacobian-vector product of ``func`` at ``primals`` along ``tangents`` (forward mode).

    Args:
        func: a function of ``len(primals)`` positional arguments returning a pytree of
            floating-point tensors (or ``(output, aux)`` when ``has_aux=True``).
        primals: a tuple with one pytree per positional argument of ``func``.
        tangents: a tuple with the same structure, shapes and dtypes as ``primals``.
        has_aux: whether ``func`` returns ``(output, aux)``. (default: ``False``)

    Returns:
        ``(output, tangents_out)``, or ``(output, tangents_out, aux)``, where
        ``tangents_out`` has the structure of ``output``.

    Example:
        >>> import torch, functx
        >>> functx.jvp(torch.sin, (torch.tensor(0.0),), (torch.tensor(2.0),))
        (tensor(0.), tensor(2.))
    """
    check_callable(func, "func", "jvp")
    check_bool(has_aux, "has_aux", "jvp")
    primals = check_primals(primals, "primals", "jvp")
    tangents = check_primals(tangents, "tangents", "jvp")
    call = Call("jvp", func, primals, {}, None, has_aux, roots=("primals",))
    call.require_leaves("primals")
    flat_tangents = flatten_like(tangents, call.in_spec, call.leaves, name="tangents", api="jvp", ref="the primals")
    torch_fn, outputs = call.fn("torch")
    # torch.func.jvp would let `func` write the caller's tensors: it gets copies of the
    # primals (checked) and of the tangents (a write to a dual writes its tangent too)
    with InplaceGuard(call, copy=True) as fresh:
        flat_tangents = tracked_copies(flat_tangents)
        out, tangents_out, aux = unpack(internals.jvp(torch_fn, tuple(fresh), tuple(flat_tangents), has_aux), has_aux)
    result = (outputs.unflatten(as_leaves(out)), outputs.unflatten(resolved(as_leaves(tangents_out))))
    return result + (outputs.aux(aux),) if has_aux else result


@overload
def linearize(
    func: Callable[..., Any], *primals: Any, has_aux: Literal[False] = ...
) -> tuple[TensorTree, Callable[..., TensorTree]]: ...
@overload
def linearize(
    func: Callable[..., Any], *primals: Any, has_aux: Literal[True]
) -> tuple[TensorTree, Callable[..., TensorTree], PyTree]: ...


def linearize(func: Callable[..., Any], *primals: Any, has_aux: bool = False) -> tuple[Any, ...]:
    """Evaluate ``func`` at ``primals`` and return its linearization there.

    Unlike ``torch.func.linearize`` (which traces with ``make_fx``), the returned
    ``jvp_fn`` is an ordinary forward-mode product, so it composes with every transform
    and with :func:`functx.vmap`; under ``vmap`` over tangents the primal computation
    runs once per batch.

    Args:
        func: a function of the positional ``primals`` returning a pytree of tensors
            (or ``(output, aux)`` when ``has_aux=True``).
        *primals: the point, one pytree per positional argument.
        has_aux: whether ``func`` returns ``(output, aux)``. (default: ``False``)

    Returns:
        ``(output, jvp_fn)`` or ``(output, jvp_fn, aux)``; ``jvp_fn(*tangents)`` returns
        the tangent of the output for tangents shaped like ``primals``.

    Example:
        >>> import torch, functx
        >>> out, jvp_fn = functx.linearize(torch.exp, torch.tensor(0.0))
        >>> jvp_fn(torch.tensor(3.0))
        tensor(3.)
    """
    check_callable(func, "func", "linearize")
    check_bool(has_aux, "has_aux", "linearize")
    call = Call("linearize", func, primals, {}, None, has_aux, roots=("primals",))
    call.require_leaves("primals")
    flat_fn, outputs = call.fn("flat")
    with InplaceGuard(call, copy=True) as fresh:
        out, aux = flat_fn(*fresh)

    def jvp_fn(*tangents: Any) -> Any:
        flat = flatten_like(tangents, call.in_spec, call.leaves, name="tangents", api="linearize", ref="the primals")
        torch_fn, _ = call.fn("torch")
        with InplaceGuard(call, copy=True) as fresh:
            result = internals.jvp(torch_fn, tuple(fresh), tuple(tracked_copies(flat)), has_aux)
        return outputs.unflatten(resolved(as_leaves(result[1])))

    result = (outputs.unflatten(out), jvp_fn)
    return result + (outputs.aux(aux),) if has_aux else result
