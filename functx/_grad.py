"""``value_and_grad`` and its projection ``grad``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

import torch

from ._core import (
    Call,
    InplaceGuard,
    Outputs,
    all_argnums,
    autograd_grad,
    check_argnums,
    check_bool,
    check_callable,
    plain_autograd,
    reaches_other_leaves,
    tracked_copies,
)
from ._torch_internals import grad_and_value
from ._tree import PyTree, TensorTree


@overload
def value_and_grad(
    func: Callable[..., Any], argnums: int | tuple[int, ...] = ..., has_aux: Literal[False] = ...
) -> Callable[..., tuple[torch.Tensor, TensorTree]]: ...
@overload
def value_and_grad(
    func: Callable[..., Any], argnums: int | tuple[int, ...], has_aux: Literal[True]
) -> Callable[..., tuple[tuple[torch.Tensor, PyTree], TensorTree]]: ...
@overload
def value_and_grad(
    func: Callable[..., Any], argnums: int | tuple[int, ...] = ..., *, has_aux: Literal[True]
) -> Callable[..., tuple[tuple[torch.Tensor, PyTree], TensorTree]]: ...


def value_and_grad(
    func: Callable[..., Any], argnums: int | tuple[int, ...] = 0, has_aux: bool = False
) -> Callable[..., Any]:
    """Return a function computing the value of ``func`` and its gradient.

    Args:
        func: a function returning a real scalar (0-dimensional) tensor, or a pair
            ``(scalar, aux)`` when ``has_aux=True``. Its arguments may be any pytrees.
        argnums: which positional argument(s) to differentiate with respect to: an int,
            or a tuple of ints (negative values count from the end). (default: ``0``)
        has_aux: whether ``func`` returns ``(output, aux)``; ``aux`` may hold any Python
            objects and is returned undifferentiated. (default: ``False``)

    Returns:
        A function with the signature of ``func`` returning ``(value, grads)``, or
        ``((value, aux), grads)`` when ``has_aux=True``. ``grads`` has the structure of
        the selected argument (a tuple of structures when ``argnums`` is a tuple).

    Example:
        >>> import torch, functx
        >>> loss = lambda p, x: ((x @ p["w"] + p["b"]) ** 2).sum()
        >>> p = {"w": torch.ones(3), "b": torch.tensor(0.5)}
        >>> value, grads = functx.value_and_grad(loss)(p, torch.eye(3))
        >>> value
        tensor(6.7500)
        >>> grads["b"]
        tensor(9.)
    """
    check_callable(func, "func", "value_and_grad")
    return _value_and_grad(func, check_argnums(argnums, "value_and_grad"), has_aux, "value_and_grad")


@overload
def grad(
    func: Callable[..., Any], argnums: int | tuple[int, ...] = ..., has_aux: Literal[False] = ...
) -> Callable[..., TensorTree]: ...
@overload
def grad(
    func: Callable[..., Any], argnums: int | tuple[int, ...], has_aux: Literal[True]
) -> Callable[..., tuple[TensorTree, PyTree]]: ...
@overload
def grad(
    func: Callable[..., Any], argnums: int | tuple[int, ...] = ..., *, has_aux: Literal[True]
) -> Callable[..., tuple[TensorTree, PyTree]]: ...


def grad(func: Callable[..., Any], argnums: int | tuple[int, ...] = 0, has_aux: bool = False) -> Callable[..., Any]:
    """Return a function computing the gradient of a scalar ``func``.

    ``grad(f)`` is :func:`value_and_grad` without the value; see there for details.

    Args:
        func: a function returning a real scalar tensor (or ``(scalar, aux)``).
        argnums: the argument(s) to differentiate with respect to. (default: ``0``)
        has_aux: whether ``func`` returns ``(output, aux)``. (default: ``False``)

    Returns:
        A function returning ``grads`` (or ``(grads, aux)``), ``grads`` shaped like the
        selected argument(s).

    Example:
        >>> import torch, functx
        >>> f = lambda x: (x ** 3).sum()
        >>> functx.grad(f)(torch.tensor([1.0, 2.0]))
        tensor([ 3., 12.])
        >>> functx.grad(functx.grad(lambda x: x ** 3))(torch.tensor(2.0))
        tensor(12.)
    """
    check_callable(func, "func", "grad")
    return _value_and_grad(func, check_argnums(argnums, "grad"), has_aux, "grad", value=False)


def _value_and_grad(
    func: Callable[..., Any], argnums: int | tuple[int, ...], has_aux: bool, api: str, value: bool = True
) -> Callable[..., Any]:
    check_bool(has_aux, "has_aux", api)

    def value_and_grad_fn(*args: Any, **kwargs: Any) -> Any:
        call = Call(api, func, args, kwargs, argnums, has_aux)
        with InplaceGuard(call, copy=False) as leaves:
            grads, out, aux, outputs = grad_and_value_flat(call, leaves)
        if value:
            return outputs.with_aux(out, aux), call.unflatten_in(grads)
        return (call.unflatten_in(grads), outputs.aux(aux)) if has_aux else call.unflatten_in(grads)

    return functools.update_wrapper(value_and_grad_fn, func)


def grad_and_value_flat(
    call: Call, leaves: Sequence[torch.Tensor], outputs: Outputs | None = None
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, Any, Outputs]:
    """``(grads, value, aux_tensors, outputs)`` of ``call``'s scalar function at ``leaves``
    (``outputs``: the record to fill, a new one by default).

    This is the hot path of every gradient, so it uses the cheapest calling convention of
    ``torch.func.grad_and_value``: an int ``argnums`` for a single leaf and ``has_aux`` only
    when asked for (each costs torch.func a few microseconds of pytree work otherwise).
    """
    if not leaves:  # nothing to differentiate: an empty structure of gradients
        scalar_fn, outputs = call.fn("scalar", outputs)
        value, aux = scalar_fn()
        return (), value, aux, outputs
    if plain_autograd(*leaves):
        try:
            plain_grads, value, aux, _, outputs = plain_derivatives(call, leaves, outputs=outputs)
            return plain_grads, value, aux, outputs
        except RuntimeError:  # e.g. a captured inference tensor: torch.func's engine decides
            pass
    fn, outputs = call.fn("scalar" if call.has_aux else "scalar_no_aux", outputs)
    grads: tuple[torch.Tensor, ...]
    if len(leaves) == 1:
        grad, result = grad_and_value(fn, 0, call.has_aux, (leaves[0],))
        grads = (grad,)
    else:
        grads, result = grad_and_value(fn, all_argnums(len(leaves)), call.has_aux, tuple(leaves))
    return (grads, *result, outputs) if call.has_aux else (grads, result, (), outputs)


def plain_derivatives(
    call: Call,
    leaves: Sequence[torch.Tensor],
    tangents: Sequence[torch.Tensor] | None = None,
    outputs: Outputs | None = None,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, Any, tuple[torch.Tensor, ...] | None, Outputs]:
    """``(grads, value, aux_tensors, hvp, outputs)`` of ``call``'s scalar function with plain
    autograd, for top-level eager calls (see ``plain_autograd``): the same numbers as the
    torch.func engine without its per-operation dispatch (the "grad overhead" rows of
    docs/benchmarks.md). ``hvp`` is the Hessian applied to ``tangents`` (reverse over
    reverse), or None.
    """
    inputs = [_fresh_leaf(leaf) for leaf in leaves]  # new tensors: the user's are untouched
    static = call.static_tensors()
    marks = [t.grad_fn for t in static]
    scalar_fn, outputs = call.fn("scalar", outputs)
    with torch.enable_grad():  # a transform ignores an enclosing no_grad, as torch.func does
        value, aux = scalar_fn(*inputs)
        outer = reaches_other_leaves([value, *aux], inputs)
        grads = autograd_grad([value], inputs, create_graph=outer or tangents is not None)
        products = None if tangents is None else autograd_grad(grads, inputs, tangents, create_graph=outer)
    _cut_written(static, marks)
    if outer:  # differentiable w.r.t. captured tensors, as torch.func's results would be
        return grads, value, aux, products, outputs
    return tuple(g.detach() for g in grads), value.detach(), tuple(a.detach() for a in aux), products, outputs


def _fresh_leaf(leaf: torch.Tensor) -> torch.Tensor:
    """A new leaf requiring grad with the values of ``leaf`` (an inference tensor, which
    cannot require grad, is copied into a normal one)."""
    if leaf.is_inference():
        return tracked_copies([leaf])[0].requires_grad_()
    return leaf.detach().requires_grad_()


def _cut_written(static: Sequence[torch.Tensor], marks: Sequence[Any]) -> None:
    """A non-differentiated argument that `func` wrote in place with values of our graph keeps
    the values (as under torch.func) but not our graph: it must not start requiring grad."""
    for t, mark in zip(static, marks):
        if t.grad_fn is not mark and mark is None:
            try:
                t.detach_()
            except RuntimeError:  # a view cannot be detached in place; its base carries the graph
                pass
