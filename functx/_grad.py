"""``value_and_grad`` and its projection ``grad``."""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from ._core import Call, all_argnums, check_argnums, check_bool, check_callable


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
    check_callable(func, "value_and_grad")
    return _value_and_grad(func, check_argnums(argnums, "value_and_grad"), has_aux, "value_and_grad")


def grad(
    func: Callable[..., Any], argnums: int | tuple[int, ...] = 0, has_aux: bool = False
) -> Callable[..., Any]:
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
    check_callable(func, "grad")
    value_and_grad_fn = _value_and_grad(func, check_argnums(argnums, "grad"), has_aux, "grad")

    @functools.wraps(func)
    def grad_fn(*args: Any, **kwargs: Any) -> Any:
        value, grads = value_and_grad_fn(*args, **kwargs)
        return (grads, value[1]) if has_aux else grads

    return grad_fn


def _value_and_grad(
    func: Callable[..., Any], argnums: int | tuple[int, ...], has_aux: bool, api: str
) -> Callable[..., Any]:
    check_bool(has_aux, "has_aux", api)

    @functools.wraps(func)
    def value_and_grad_fn(*args: Any, **kwargs: Any) -> Any:
        call = Call(api, func, args, kwargs, argnums, has_aux)
        if call.leaves:
            grads, (value, aux) = torch.func.grad_and_value(
                call.scalar_fn, argnums=all_argnums(len(call.leaves)), has_aux=True
            )(*call.leaves)
        else:  # nothing to differentiate: an empty structure of gradients
            grads, (value, aux) = (), call.scalar_fn()
        return call.with_aux(value, aux), call.unflatten_in(grads)

    return value_and_grad_fn
