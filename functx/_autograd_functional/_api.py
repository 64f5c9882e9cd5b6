"""The six public functions of :mod:`functx.autograd_functional`, each reading its spec."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from ._checks import as_tuple, check_strategy
from ._compute import FORWARD_MODE, Strategy
from ._engine import call
from ._spec import SPECS, Spec


def vjp(func: Callable[..., Any], inputs: Any, v: Any = None, create_graph: bool = False, strict: bool = False) -> Any:
    """Vector-Jacobian product ``v^T J`` of ``func`` at ``inputs``.

    One backward pass is already the best algorithm, so this is the original
    :func:`torch.autograd.functional.vjp` (``torch.func`` would only add overhead).

    Args:
        func: a function of Tensors returning a Tensor or a tuple of Tensors.
        inputs: a Tensor or a tuple of Tensors, the point.
        v: shaped like the output; optional when the output has a single element
            (then ``1``). (default: ``None``)
        create_graph: whether the results are differentiable. (default: ``False``)
        strict: raise if an input does not influence the outputs instead of returning
            zeros for it. (default: ``False``)

    Returns:
        ``(func_output, vjp)``, ``vjp`` shaped like ``inputs``.

    Example:
        >>> import torch
        >>> import functx.autograd_functional as AF
        >>> AF.vjp(lambda x: x ** 2, torch.tensor([1.0, 2.0]), torch.ones(2))
        (tensor([1., 4.]), tensor([2., 4.]))
    """
    return SPECS["vjp"].original(func, inputs, v, create_graph, strict)


def jvp(func: Callable[..., Any], inputs: Any, v: Any = None, create_graph: bool = False, strict: bool = False) -> Any:
    """Jacobian-vector product ``J v`` of ``func`` at ``inputs``.

    Forward mode (functx's core) for inputs of at least
    ``functx._autograd_functional._spec.JVP_FORWARD_MODE_MIN_NUMEL`` elements; below it, and with
    ``strict=True``, the original's double-backward trick, which is cheaper there.

    Args:
        func: a function of Tensors returning a Tensor or a tuple of Tensors.
        inputs: a Tensor or a tuple of Tensors, the point.
        v: shaped like ``inputs``; optional when ``inputs`` is a single one-element
            Tensor (then ``1``). (default: ``None``)
        create_graph: whether the results are differentiable. (default: ``False``)
        strict: raise if the outputs do not depend on an input. (default: ``False``)

    Returns:
        ``(func_output, jvp)``, ``jvp`` shaped like the output.

    Example:
        >>> import torch
        >>> import functx.autograd_functional as AF
        >>> AF.jvp(lambda x, y: x * y, (torch.tensor(2.0), torch.tensor(3.0)), (torch.tensor(1.0), torch.tensor(0.0)))
        (tensor(6.), tensor(3.))
    """
    spec = SPECS["jvp"]
    fallback = functools.partial(spec.original, func, inputs, v, create_graph, strict)
    return call(spec, func, inputs, v, create_graph, strict, fallback)


def jacobian(
    func: Callable[..., Any],
    inputs: Any,
    create_graph: bool = False,
    strict: bool = False,
    vectorize: bool = False,
    strategy: Strategy = "reverse-mode",
) -> Any:
    """Jacobian of ``func`` at ``inputs``, vectorized whatever ``vectorize`` says.

    Args:
        func: a function of Tensors returning a Tensor or a tuple of Tensors.
        inputs: a Tensor or a tuple of Tensors, the point.
        create_graph: whether the Jacobian is differentiable. (default: ``False``)
        strict: raise if an output does not depend on an input (checked with plain
            autograd, one backward per output). Not with ``vectorize=True`` or
            ``strategy="forward-mode"``, as in the original. (default: ``False``)
        vectorize: accepted for compatibility; the computation is always vectorized.
            (default: ``False``)
        strategy: ``"reverse-mode"`` (one vector-Jacobian product per output element,
            batched) or ``"forward-mode"`` (one Jacobian-vector product per input element,
            batched); both without ``vectorize=True`` and with ``create_graph=True`` too.
            (default: ``"reverse-mode"``)

    Returns:
        A Tensor of shape ``output.shape + input.shape`` for a Tensor input and output; a
        tuple over inputs (or over outputs) if one of them is a tuple; a tuple over outputs
        of tuples over inputs if both are. Forward mode returns lists where the input
        level is a tuple, as the original does.

    Example:
        >>> import torch
        >>> import functx.autograd_functional as AF
        >>> AF.jacobian(lambda x: x ** 2, torch.tensor([1.0, 2.0]))
        tensor([[2., 0.],
                [0., 4.]])
        >>> J = AF.jacobian(lambda x, y: (x * y, x + y), (torch.ones(2), torch.ones(3, 1)))
        >>> J[0][1].shape
        torch.Size([3, 2, 3, 1])
    """
    return _derivative(SPECS["jacobian"], func, inputs, create_graph, strict, vectorize, strategy)


def hessian(
    func: Callable[..., Any],
    inputs: Any,
    create_graph: bool = False,
    strict: bool = False,
    vectorize: bool = False,
    outer_jacobian_strategy: Strategy = "reverse-mode",
) -> Any:
    """Hessian of a single-element ``func`` at ``inputs``, vectorized.

    Args:
        func: a function of Tensors returning a Tensor with a single element.
        inputs: a Tensor or a tuple of Tensors, the point.
        create_graph: whether the Hessian is differentiable. (default: ``False``)
        strict: raise if the Jacobian or the Hessian does not depend on an input
            (checked with plain autograd). Not with ``vectorize=True`` or forward mode,
            as in the original. (default: ``False``)
        vectorize: accepted for compatibility; the computation is always vectorized.
            (default: ``False``)
        outer_jacobian_strategy: how the Jacobian of the gradient is taken:
            ``"reverse-mode"`` or ``"forward-mode"`` (forward over reverse, also without
            ``vectorize=True``). (default: ``"reverse-mode"``)

    Returns:
        A Tensor of shape ``input.shape + input.shape`` for a Tensor input; for a tuple,
        a tuple of tuples with ``H[i][j]`` of shape ``inputs[i].shape + inputs[j].shape``.

    Example:
        >>> import torch
        >>> import functx.autograd_functional as AF
        >>> AF.hessian(lambda x: (x ** 3).sum(), torch.tensor([1.0, 2.0]))
        tensor([[ 6.,  0.],
                [ 0., 12.]])
    """
    return _derivative(SPECS["hessian"], func, inputs, create_graph, strict, vectorize, outer_jacobian_strategy)


def vhp(func: Callable[..., Any], inputs: Any, v: Any = None, create_graph: bool = False, strict: bool = False) -> Any:
    """Vector-Hessian product ``v^T H`` of a single-element ``func`` at ``inputs``.

    Reverse over reverse, two backward passes, is already the best algorithm, so this is
    the original :func:`torch.autograd.functional.vhp`.

    Args:
        func: a function of Tensors returning a Tensor with a single element.
        inputs: a Tensor or a tuple of Tensors, the point.
        v: shaped like ``inputs``; optional for a single one-element input.
            (default: ``None``)
        create_graph: whether the results are differentiable. (default: ``False``)
        strict: raise if the gradient does not depend on an input. (default: ``False``)

    Returns:
        ``(func_output, vhp)``, ``vhp`` shaped like ``inputs``.

    Example:
        >>> import torch
        >>> import functx.autograd_functional as AF
        >>> AF.vhp(lambda x: (x ** 3).sum(), torch.tensor([1.0, 2.0]), torch.ones(2))
        (tensor(9.), tensor([ 6., 12.]))
    """
    return SPECS["vhp"].original(func, inputs, v, create_graph, strict)


def hvp(func: Callable[..., Any], inputs: Any, v: Any = None, create_graph: bool = False, strict: bool = False) -> Any:
    """Hessian-vector product ``H v`` of a single-element ``func`` at ``inputs``.

    Computed as ``(v^T H)^T`` by reverse over reverse (two backward passes) instead of the
    original's double-backward trick (three): the same numbers whenever the Hessian is
    symmetric, which it is for every twice continuously differentiable function and for
    everything autograd's double-backward formulas differentiate; one backward pass fewer. With
    ``strict=True`` the original runs, since its checks belong to the trick.

    Args:
        func: a function of Tensors returning a Tensor with a single element.
        inputs: a Tensor or a tuple of Tensors, the point.
        v: shaped like ``inputs``; optional for a single one-element input.
            (default: ``None``)
        create_graph: whether the results are differentiable. (default: ``False``)
        strict: raise if the gradient does not depend on an input. (default: ``False``)

    Returns:
        ``(func_output, hvp)``, ``hvp`` shaped like ``inputs``.

    Example:
        >>> import torch
        >>> import functx.autograd_functional as AF
        >>> AF.hvp(lambda x, y: (x ** 2 * y).sum(), (torch.tensor([1.0]), torch.tensor([3.0])),
        ...        (torch.tensor([1.0]), torch.tensor([0.0])))
        (tensor(3.), (tensor([6.]), tensor([2.])))
    """
    spec = SPECS["hvp"]
    fallback = functools.partial(spec.original, func, inputs, v, create_graph, strict)
    return call(spec, func, inputs, v, create_graph, strict, fallback)


def _derivative(
    spec: Spec, func: Callable[..., Any], inputs: Any, create_graph: bool, strict: bool, vectorize: bool, strategy: str
) -> Any:
    """``jacobian`` and ``hessian``: the original's argument checks in its order, then :func:`call`."""
    if spec.inputs_checked_first:
        as_tuple(inputs, "inputs", spec.name)
    check_strategy(spec, strategy)

    def fallback() -> Any:
        # The original's forward mode lets func write the caller's tensors: give it copies
        # (the same results: it detaches its inputs without create_graph anyway).
        safe = strategy == FORWARD_MODE and not create_graph
        return spec.original(func, _copies(inputs) if safe else inputs, create_graph, strict, vectorize, strategy)

    return call(spec, func, inputs, None, create_graph, strict, fallback, vectorize=vectorize, strategy=strategy)


def _copies(inputs: Any) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.detach().clone()
    if isinstance(inputs, tuple):
        return tuple(_copies(x) for x in inputs)
    return inputs  # invalid: the original raises its error
