"""``hessian`` and ``hvp``: second-order compositions of the first-order engines.

Both take a ``mode`` naming the composition outer-inner: ``"rev-rev"`` (reverse over
reverse: the Jacobian/VJP of the gradient), ``"fwd-rev"`` (forward over reverse, what
``torch.func.hessian`` and the ``jvp(grad(f))`` recipe use), and for ``hvp`` also
``"rev-fwd"`` (the gradient of a JVP).

``"auto"`` picks per call, from the device of the inputs:

* ``hessian``: ``"rev-rev"`` on CPU, where it is faster than forward over reverse for
  dense and per-sample Hessians (the hessian rows of docs/benchmarks.md); ``"fwd-rev"`` elsewhere (torch.func's choice),
  falling back to ``"rev-rev"`` in eager mode when forward over reverse raises
  ``NotImplementedError``/``RuntimeError`` (an operation with no forward-mode derivative
  of its backward: ``F.huber_loss``, ``F.mse_loss`` in torch 2.13) and reverse over
  reverse succeeds; if both fail, the first error is raised. torch's message is not read.
* ``hvp``: ``"rev-rev"`` everywhere: it costs about two gradients, and it works for the
  losses where ``jvp(grad(f))`` crashes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

import torch

from ._core import (
    Call,
    InplaceGuard,
    Outputs,
    as_leaves,
    check_argnums,
    check_bool,
    check_callable,
    check_choice,
    check_chunk_size,
    check_primals,
    pack_like,
    plain_autograd,
    resolved,
    torch_result,
    unpack,
)
from ._grad import grad_and_value_flat, plain_derivatives
from ._jacobian import Tensors, jacobian_flat
from ._tree import PyTree, TensorTree, describe, flatten_like

HessianMode = Literal["auto", "rev-rev", "fwd-rev"]
HvpMode = Literal["auto", "rev-rev", "fwd-rev", "rev-fwd"]
HESSIAN_MODES: tuple[HessianMode, ...] = ("auto", "rev-rev", "fwd-rev")
HVP_MODES: tuple[HvpMode, ...] = ("auto", "rev-rev", "fwd-rev", "rev-fwd")


@overload
def hessian(
    func: Callable[..., Any],
    argnums: int | tuple[int, ...] = ...,
    has_aux: Literal[False] = ...,
    *,
    chunk_size: int | None = ...,
    mode: HessianMode = ...,
    holomorphic: bool = ...,
) -> Callable[..., TensorTree]: ...
@overload
def hessian(
    func: Callable[..., Any],
    argnums: int | tuple[int, ...],
    has_aux: Literal[True],
    *,
    chunk_size: int | None = ...,
    mode: HessianMode = ...,
    holomorphic: bool = ...,
) -> Callable[..., tuple[TensorTree, PyTree]]: ...
@overload
def hessian(
    func: Callable[..., Any],
    argnums: int | tuple[int, ...] = ...,
    *,
    has_aux: Literal[True],
    chunk_size: int | None = ...,
    mode: HessianMode = ...,
    holomorphic: bool = ...,
) -> Callable[..., tuple[TensorTree, PyTree]]: ...


def hessian(
    func: Callable[..., Any],
    argnums: int | tuple[int, ...] = 0,
    has_aux: bool = False,
    *,
    chunk_size: int | None = None,
    mode: HessianMode = "auto",
    holomorphic: bool = False,
) -> Callable[..., Any]:
    """Hessian of ``func``: the Jacobian of its Jacobian, dense.

    Args:
        func: a function returning a pytree of floating-point tensors, usually a scalar
            (or ``(output, aux)`` when ``has_aux=True``).
        argnums: the argument(s) to differentiate with respect to. (default: ``0``)
        has_aux: whether ``func`` returns ``(output, aux)``. (default: ``False``)
        chunk_size: how many Hessian rows to compute at once; bounds memory.
            (default: ``None``, all at once)
        mode: ``"auto"``, ``"rev-rev"`` or ``"fwd-rev"``; see the module notes.
            (default: ``"auto"``: reverse-over-reverse on CPU)
        holomorphic: promise that ``func`` is holomorphic (complex inputs and outputs); the
            Hessian is then ``d2f/dz2``. Without it, complex inputs and outputs are refused
            (``TypeError``): the Hessian of a real function of complex inputs is not a
            complex matrix; differentiate ``torch.view_as_real`` parts instead.
            (default: ``False``)

    Returns:
        A function returning the Hessian (or ``(hessian, aux)``): output structure, then
        input structure twice, each leaf of shape ``out.shape + in_i.shape + in_j.shape``.

    Example:
        >>> import torch, functx
        >>> f = lambda p: (p["x"] ** 2 * p["y"]).sum()
        >>> H = functx.hessian(f)({"x": torch.tensor([1.0]), "y": torch.tensor([3.0])})
        >>> H["x"]["x"], H["x"]["y"]
        (tensor([[6.]]), tensor([[2.]]))
    """
    check_callable(func, "func", "hessian")
    argnums = check_argnums(argnums, "hessian")
    check_bool(has_aux, "has_aux", "hessian")
    chunk_size = check_chunk_size(chunk_size, "hessian")
    check_choice(mode, "mode", HESSIAN_MODES, "hessian")
    check_bool(holomorphic, "holomorphic", "hessian")

    options: dict[str, Any] = {"has_aux": has_aux, "chunk_size": chunk_size, "holomorphic": holomorphic}

    def hessian_fn(*args: Any, **kwargs: Any) -> Any:
        call = Call("hessian", func, args, kwargs, argnums, has_aux, holomorphic=holomorphic)
        if not holomorphic:
            _refuse_complex_inputs(call)
        outputs = Outputs(has_aux)

        def jac(*leaves: torch.Tensor) -> Any:
            inner = call.with_args(tuple(call.lifted_args()))  # func's own arguments, at this level too
            _, blocks, aux = jacobian_flat(inner.fn("torch", outputs)[0], leaves, rev=True, **options)
            return torch_result([b for row in blocks for b in row], aux, has_aux)

        outer = lambda rev: jacobian_flat(jac, call.leaves, rev=rev, **options)
        if call.leaves:
            with InplaceGuard(call, copy=False):
                _, blocks, aux = _with_mode(
                    mode, call.leaves, rev_rev=lambda: outer(True), fwd_rev=lambda: outer(False)
                )
        else:  # nothing to differentiate: empty Hessian blocks
            flat_fn, outputs = call.fn("flat")
            (_, aux), blocks = flat_fn(), []  # evaluated for the output structure and aux
        n = len(call.leaves)
        rows = [
            call.unflatten_in([call.unflatten_in(resolved(blocks[o * n + i])) for i in range(n)])
            for o in range(outputs.spec.num_leaves)
        ]
        return outputs.with_aux(outputs.unflatten(rows), aux)

    return functools.update_wrapper(hessian_fn, func)


def _refuse_complex_inputs(call: Call) -> None:
    for k, leaf in enumerate(call.leaves):
        if leaf.is_complex():
            raise TypeError(
                f"`functx.hessian`: differentiated input {call.input_paths()[k]} is {describe(leaf)}. The "
                f"Hessian is a complex matrix only for a holomorphic `func`: pass holomorphic=True if it is; "
                f"otherwise differentiate with respect to real tensors (`torch.view_as_real(z)`)."
            )


@overload
def hvp(
    func: Callable[..., Any], primals: Any, tangents: Any, has_aux: Literal[False] = ..., *, mode: HvpMode = ...
) -> tuple[tuple[TensorTree, ...], tuple[TensorTree, ...]]: ...
@overload
def hvp(
    func: Callable[..., Any], primals: Any, tangents: Any, has_aux: Literal[True], *, mode: HvpMode = ...
) -> tuple[tuple[TensorTree, ...], tuple[TensorTree, ...], PyTree]: ...


def hvp(
    func: Callable[..., Any], primals: Any, tangents: Any, has_aux: bool = False, *, mode: HvpMode = "auto"
) -> tuple[Any, ...]:
    """Hessian-vector product of a scalar ``func`` at ``primals``, without forming the Hessian.

    Args:
        func: a function of ``len(primals)`` positional arguments returning a real scalar
            tensor (or ``(scalar, aux)`` when ``has_aux=True``).
        primals: a tuple with one pytree per positional argument of ``func``.
        tangents: a tuple with the structure, shapes and dtypes of ``primals``.
        has_aux: whether ``func`` returns ``(output, aux)``. (default: ``False``)
        mode: ``"auto"``, ``"rev-rev"``, ``"fwd-rev"`` or ``"rev-fwd"``; see the module
            notes. (default: ``"auto"``: reverse over reverse)

    Returns:
        ``(grads, hvp_out)`` or ``(grads, hvp_out, aux)``: the gradient at ``primals``
        and the Hessian applied to ``tangents``, both tuples shaped like ``primals``.

    Example:
        >>> import torch, functx
        >>> f = lambda x: (x ** 3).sum()
        >>> x = torch.tensor([1.0, 2.0])
        >>> functx.hvp(f, (x,), (torch.ones(2),))
        ((tensor([ 3., 12.]),), (tensor([ 6., 12.]),))
    """
    check_callable(func, "func", "hvp")
    check_bool(has_aux, "has_aux", "hvp")
    check_choice(mode, "mode", HVP_MODES, "hvp")
    primals = check_primals(primals, "primals", "hvp")
    tangents = check_primals(tangents, "tangents", "hvp")
    call = Call("hvp", func, primals, {}, None, has_aux, roots=("primals",))
    flat_tangents = tuple(
        flatten_like(tangents, call.in_spec, call.leaves, name="tangents", api="hvp", ref="the primals")
    )
    outputs = Outputs(has_aux)
    if not call.leaves:
        _, aux = call.fn("scalar", outputs)[0]()
        grads: Tensors = ()
        products: Tensors = ()
    else:
        run = HVP_RUNNERS[mode]
        with InplaceGuard(call, copy=False):
            if run is _hvp_rev_rev and plain_autograd(*call.leaves, *flat_tangents):
                try:
                    grads, products, aux = _hvp_plain(call, flat_tangents, outputs)
                except RuntimeError:  # e.g. a captured inference tensor: torch.func's engine decides
                    grads, products, aux = run(call, flat_tangents, outputs)
            else:
                grads, products, aux = run(call, flat_tangents, outputs)
    result = (call.unflatten_in(resolved(grads)), call.unflatten_in(resolved(products)))
    return result + (outputs.aux(aux),) if has_aux else result


def _with_mode(
    mode: HessianMode, leaves: Sequence[torch.Tensor], *, rev_rev: Callable[[], Any], fwd_rev: Callable[[], Any]
) -> Any:
    """Run the ``mode`` composition; ``"auto"`` chooses by device (see the module notes)."""
    if mode == "rev-rev" or (mode == "auto" and _prefers_rev_rev(leaves)):
        return rev_rev()
    if mode == "fwd-rev" or torch.compiler.is_compiling():
        return fwd_rev()
    try:
        return fwd_rev()
    except (NotImplementedError, RuntimeError) as err:
        # An operation without a forward-mode derivative of its backward raises one of
        # these. Rather than read torch's message, retry reverse over reverse: if that
        # works it is the right answer; if it fails too the error was not about forward
        # mode and the first error is the one to show.
        try:
            return rev_rev()
        except Exception:
            raise err from None


def _prefers_rev_rev(leaves: Sequence[torch.Tensor]) -> bool:
    return not leaves or leaves[0].device.type == "cpu"


def _grad_fn(call: Call, outputs: Outputs) -> Callable[..., Any]:
    """The gradient of ``call``'s scalar function as a flat function in torch.func's convention."""

    def grad_fn(*leaves: torch.Tensor) -> Any:
        grads, _, aux, _ = grad_and_value_flat(call, leaves, outputs)
        return torch_result(grads, aux, call.has_aux)

    return grad_fn


def _hvp_rev_rev(call: Call, tangents: Tensors, outputs: Outputs) -> tuple[Tensors, Tensors, Tensors]:
    result = torch.func.vjp(_grad_fn(call, outputs), *call.leaves, has_aux=call.has_aux)
    grads, pullback, aux = unpack(result, call.has_aux)
    return as_leaves(grads), pullback(pack_like(tangents, grads)), aux


def _hvp_plain(call: Call, tangents: Tensors, outputs: Outputs) -> tuple[Tensors, Tensors, Tensors]:
    """:func:`_hvp_rev_rev` with plain autograd, for top-level eager calls."""
    grads, _, aux, products, _ = plain_derivatives(call, call.leaves, tangents, outputs)
    assert products is not None  # asked for with `tangents`
    return grads, products, aux


def _hvp_fwd_rev(call: Call, tangents: Tensors, outputs: Outputs) -> tuple[Tensors, Tensors, Tensors]:
    result = torch.func.jvp(_grad_fn(call, outputs), tuple(call.leaves), tangents, has_aux=call.has_aux)
    grads, products, aux = unpack(result, call.has_aux)
    return as_leaves(grads), as_leaves(products), aux


def _hvp_rev_fwd(call: Call, tangents: Tensors, outputs: Outputs) -> tuple[Tensors, Tensors, Tensors]:
    scalar_fn, _ = call.fn("scalar", outputs)

    def value_and_slope(*leaves: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], Tensors]:
        value, slope, aux = unpack(torch.func.jvp(scalar_fn, leaves, tangents, has_aux=True), True)
        return (value, slope), aux

    (value, slope), pullback, aux = unpack(torch.func.vjp(value_and_slope, *call.leaves, has_aux=True), True)
    one, zero = torch.ones_like(value), torch.zeros_like(slope)
    return pullback((one, zero)), pullback((zero, one)), aux


HVP_RUNNERS: dict[str, Callable[[Call, Tensors, Outputs], tuple[Tensors, Tensors, Tensors]]] = {
    "auto": _hvp_rev_rev,
    "rev-rev": _hvp_rev_rev,
    "fwd-rev": _hvp_fwd_rev,
    "rev-fwd": _hvp_rev_fwd,
}
