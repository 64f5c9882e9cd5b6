"""``jacrev`` and ``jacfwd``: one engine, a reverse and a forward flavour.

The engine works on flat functions in torch.func's convention (see ``Call.torch_fn``) and
returns ``jac[o][i]`` of shape ``out_leaves[o].shape + leaves[i].shape`` (JAX's layout).
It pulls back (reverse) or pushes forward (forward) the rows of an identity basis with
``torch.func.vmap``, ``chunk_size`` rows at a time, and skips ``vmap`` entirely when the
basis has a single row (scalar outputs in reverse mode, scalar inputs in forward mode).

Complex numbers follow JAX's rule (``holomorphic=``), with torch's gradient convention:

* ``holomorphic=True``: every differentiated input and every output is complex, and the
  Jacobian is the complex derivative ``df/dz`` in both modes (reverse mode conjugates
  torch's vector-Jacobian products, which give ``conj(df/dz)``).
* ``holomorphic=False`` (default): complex outputs are refused with a ``TypeError`` (their
  Jacobian is not a complex matrix unless ``func`` is holomorphic). A complex input
  ``z = x + iy`` of a real output ``u`` gets ``du/dx + i du/dy`` in both modes, the
  convention of :func:`functx.grad` and torch (``2 du/dconj(z)``, the steepest-ascent
  direction: ``z - lr * grad`` descends). JAX returns the conjugate, ``du/dx - i du/dy``.
  Forward mode pushes the real and the imaginary unit directions to get it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

import torch

from ._core import (
    Call,
    InplaceGuard,
    as_leaves,
    check_argnums,
    check_bool,
    check_callable,
    check_choice,
    check_chunk_size,
    pack_like,
    resolved,
    unpack,
)
from ._torch_internals import jvp, vjp, vmap_leading
from ._tree import PyTree, TensorTree, tree_flatten, tree_unflatten

Tensors = tuple[torch.Tensor, ...]
Randomness = Literal["error", "different", "same"]
FlatFn = Callable[..., tuple[Tensors, Tensors]]


def jacobian_flat(
    fn: FlatFn,
    leaves: Sequence[torch.Tensor],
    *,
    has_aux: bool,
    rev: bool,
    chunk_size: int | None,
    randomness: str = "error",
    holomorphic: bool = False,
) -> tuple[Tensors, list[list[torch.Tensor]], Tensors]:
    """Jacobian of a flat function: ``(out_leaves, jac, aux_tensors)``; see the module doc.

    Complex numbers (see the module doc): with ``holomorphic`` the blocks are ``df/dz``; without,
    the outputs must be real and a complex input ``z = x + iy`` gets ``du/dx + i du/dy``.
    """
    leaves = tuple(leaves)
    if rev:
        outs, jac, aux = _jacobian_rev(fn, leaves, has_aux, chunk_size, randomness)
        if holomorphic:  # a vector-Jacobian product gives conj(df/dz); resolved: no lazy conj bit
            jac = [[block.conj().resolve_conj() for block in row] for row in jac]
        return outs, jac, aux
    outs, jac, aux = _jacobian_fwd(fn, leaves, has_aux, chunk_size, randomness, 1)
    if not holomorphic and any(x.is_complex() for x in leaves):  # the i-directions too
        _, imag, _ = _jacobian_fwd(fn, leaves, has_aux, chunk_size, randomness, 1j)
        jac = [[_combine(r, m, x) for r, m, x in zip(rr, mm, leaves)] for rr, mm in zip(jac, imag)]
    return outs, jac, aux


def _combine(real_dir: torch.Tensor, imag_dir: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``du/dx + i du/dy`` for a complex input ``x``; real inputs keep their block."""
    return torch.complex(real_dir, imag_dir) if x.is_complex() else real_dir


def _jacobian_rev(
    fn: FlatFn, leaves: Tensors, has_aux: bool, chunk_size: int | None, randomness: str
) -> tuple[Tensors, list[list[torch.Tensor]], Tensors]:
    out, pullback, aux = unpack(vjp(fn, leaves, has_aux), has_aux)
    outs = as_leaves(out)
    if len(outs) == 1 and outs[0].numel() == 1:  # scalar output: one pullback, nothing to cut
        grads = pullback(torch.ones_like(outs[0]))
        return outs, [[_reshaped(g, outs[0].shape + x.shape) for g, x in zip(grads, leaves)]], aux
    rows, _ = _apply_basis(lambda cot: (pullback(pack_like(cot, out)), ()), outs, chunk_size, randomness)
    return outs, _blocks(rows, outs, leaves, rev=True), aux


def _jacobian_fwd(
    fn: FlatFn, leaves: Tensors, has_aux: bool, chunk_size: int | None, randomness: str, unit: complex
) -> tuple[Tensors, list[list[torch.Tensor]], Tensors]:
    def push(tangents: Tensors) -> tuple[Tensors, tuple[Tensors, Tensors]]:
        out, tangents_out, aux = unpack(jvp(fn, leaves, tangents, has_aux), has_aux)
        return as_leaves(tangents_out), (as_leaves(out), aux)

    cols, (outs, aux) = _apply_basis(push, leaves, chunk_size, randomness, unit)
    return outs, _blocks(cols, leaves, outs, rev=False), aux


def _reshaped(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return t if t.shape == shape else t.reshape(shape)


def _apply_basis(
    fn: Callable[[Tensors], tuple[Tensors, Any]],
    refs: Tensors,
    chunk_size: int | None,
    randomness: str,
    unit: complex = 1,
) -> tuple[Tensors, Any]:
    """Apply ``fn`` to every standard basis vector of the space of ``refs``.

    ``fn(v)`` returns ``(linear_part, extra)``; ``extra`` must not depend on ``v``. Returns
    the linear parts stacked along a new leading dimension of size ``sum(r.numel())``,
    and ``extra`` from one evaluation. ``unit`` is the nonzero entry of each basis vector
    (``1j``: the imaginary directions of complex refs; real refs then get zero vectors).
    """
    sizes = [r.numel() for r in refs]
    total = sum(sizes)
    if total <= 1:  # one basis vector (or none, when every ref is empty): no vmap needed
        linear, extra = fn(tuple(_unit_like(r, unit) for r in refs))
        return tuple(t.unsqueeze(0)[:total] for t in linear), extra
    step = total if chunk_size is None else min(chunk_size, total)
    layout: list[Any] = []  # (number of linear outputs, structure of extra), recorded while tracing

    def flat(*pieces: torch.Tensor) -> Tensors:  # flat in, flat out: torch.vmap's pytree work is per level
        linear, extra = fn(pieces)
        extra_leaves, extra_spec = tree_flatten(extra)
        layout[:] = [len(linear), extra_spec]
        return (*linear, *extra_leaves)

    chunks = [
        vmap_leading(flat, _basis(refs, sizes, start, min(start + step, total), unit), randomness)
        for start in range(0, total, step)
    ]
    n, extra_spec = layout
    linear = chunks[0][:n] if len(chunks) == 1 else tuple(torch.cat(parts) for parts in zip(*(c[:n] for c in chunks)))
    # `extra` comes out batched (an expanded view) and we keep row 0: torch.vmap refuses
    # out_dims=None for tensors batched by an enclosing vmap.
    return linear, tree_unflatten(extra_spec, [t[0] for t in chunks[0][n:]])


def _unit_like(ref: torch.Tensor, unit: complex) -> torch.Tensor:
    if unit == 1:
        return torch.ones_like(ref)
    return torch.full_like(ref, unit) if ref.is_complex() else torch.zeros_like(ref)


def _basis(refs: Tensors, sizes: list[int], start: int, stop: int, unit: complex = 1) -> Tensors:
    """Rows ``start:stop`` of ``unit`` times the identity, split column-wise and shaped like
    ``refs`` (zero blocks for real refs when ``unit`` is complex)."""
    pieces, offset = [], 0
    for ref, n in zip(refs, sizes):
        piece = ref.new_zeros((stop - start, n))  # like torch.func: keeps the layout of an enclosing vmap
        if unit == 1 or ref.is_complex():
            piece.diagonal(start - offset).fill_(unit)
        pieces.append(piece.view((stop - start,) + tuple(ref.shape)))
        offset += n
    return tuple(pieces)


def _blocks(stacked: Tensors, basis_refs: Tensors, other_refs: Tensors, *, rev: bool) -> list[list[torch.Tensor]]:
    """Cut stacked products into Jacobian blocks ``jac[o][i]`` of shape ``out.shape + in.shape``.

    ``stacked[k]`` has shape ``(sum(numel(basis_refs)), *other_refs[k].shape)``. In reverse
    mode the basis spans the outputs; in forward mode it spans the inputs and each block
    is transposed so that output dimensions come first.
    """
    sizes = [r.numel() for r in basis_refs]
    # pieces[k][b]: the rows of stacked[k] that belong to basis_refs[b]
    pieces = [torch.split(s, sizes) if len(sizes) > 1 else (s,) for s in stacked]
    if rev:  # basis = outputs (o), other = inputs (i)
        return [
            [_reshaped(pieces[i][o], basis_refs[o].shape + other_refs[i].shape) for i in range(len(other_refs))]
            for o in range(len(basis_refs))
        ]
    return [  # basis = inputs (i), other = outputs (o)
        [pieces[o][i].movedim(0, -1).reshape(other_refs[o].shape + basis_refs[i].shape) for i in range(len(basis_refs))]
        for o in range(len(other_refs))
    ]


@overload
def jacrev(
    func: Callable[..., Any],
    argnums: int | tuple[int, ...] = ...,
    has_aux: Literal[False] = ...,
    *,
    chunk_size: int | None = ...,
    holomorphic: bool = ...,
) -> Callable[..., TensorTree]: ...
@overload
def jacrev(
    func: Callable[..., Any],
    argnums: int | tuple[int, ...],
    has_aux: Literal[True],
    *,
    chunk_size: int | None = ...,
    holomorphic: bool = ...,
) -> Callable[..., tuple[TensorTree, PyTree]]: ...
@overload
def jacrev(
    func: Callable[..., Any],
    argnums: int | tuple[int, ...] = ...,
    *,
    has_aux: Literal[True],
    chunk_size: int | None = ...,
    holomorphic: bool = ...,
) -> Callable[..., tuple[TensorTree, PyTree]]: ...


def jacrev(
    func: Callable[..., Any],
    argnums: int | tuple[int, ...] = 0,
    has_aux: bool = False,
    *,
    chunk_size: int | None = None,
    holomorphic: bool = False,
) -> Callable[..., Any]:
    """Jacobian of ``func`` by reverse mode (one vector-Jacobian product per output element).

    Best when outputs are fewer than inputs.

    Args:
        func: a function returning a pytree of floating-point tensors (or
            ``(output, aux)`` when ``has_aux=True``).
        argnums: the argument(s) to differentiate with respect to. (default: ``0``)
        has_aux: whether ``func`` returns ``(output, aux)``. (default: ``False``)
        chunk_size: how many vector-Jacobian products to batch at once; ``None`` does all
            at once, smaller values bound memory. (default: ``None``)
        holomorphic: promise that ``func`` is holomorphic (complex inputs and outputs); the
            Jacobian is then ``df/dz``. Without it, complex outputs are refused (``TypeError``)
            and complex inputs of real outputs get ``du/dx + i du/dy`` (the module notes).
            (default: ``False``)

    Returns:
        A function returning the Jacobian (or ``(jacobian, aux)``): a pytree with the
        output's structure whose leaves are pytrees with the input's structure, each leaf
        of shape ``out_leaf.shape + in_leaf.shape``.

    Example:
        >>> import torch, functx
        >>> jac = functx.jacrev(lambda p: {"y": p["a"] * p["b"]})({"a": torch.ones(2), "b": torch.full((2,), 3.0)})
        >>> jac["y"]["b"]
        tensor([[1., 0.],
                [0., 1.]])
    """
    return _jacobian(func, argnums, has_aux, chunk_size, rev=True, api="jacrev", holomorphic=holomorphic)


@overload
def jacfwd(
    func: Callable[..., Any],
    argnums: int | tuple[int, ...] = ...,
    has_aux: Literal[False] = ...,
    *,
    chunk_size: int | None = ...,
    randomness: Randomness = ...,
    holomorphic: bool = ...,
) -> Callable[..., TensorTree]: ...
@overload
def jacfwd(
    func: Callable[..., Any],
    argnums: int | tuple[int, ...],
    has_aux: Literal[True],
    *,
    chunk_size: int | None = ...,
    randomness: Randomness = ...,
    holomorphic: bool = ...,
) -> Callable[..., tuple[TensorTree, PyTree]]: ...
@overload
def jacfwd(
    func: Callable[..., Any],
    argnums: int | tuple[int, ...] = ...,
    *,
    has_aux: Literal[True],
    chunk_size: int | None = ...,
    randomness: Randomness = ...,
    holomorphic: bool = ...,
) -> Callable[..., tuple[TensorTree, PyTree]]: ...


def jacfwd(
    func: Callable[..., Any],
    argnums: int | tuple[int, ...] = 0,
    has_aux: bool = False,
    *,
    chunk_size: int | None = None,
    randomness: Randomness = "error",
    holomorphic: bool = False,
) -> Callable[..., Any]:
    """Jacobian of ``func`` by forward mode (one Jacobian-vector product per input element).

    Best when inputs are fewer than outputs. Same arguments and result layout as
    :func:`jacrev`.

    Args:
        func: a function returning a pytree of floating-point tensors (or
            ``(output, aux)`` when ``has_aux=True``).
        argnums: the argument(s) to differentiate with respect to. (default: ``0``)
        has_aux: whether ``func`` returns ``(output, aux)``. (default: ``False``)
        chunk_size: how many Jacobian-vector products to batch at once. (default: ``None``)
        randomness: how random operations behave across the batched products, as in
            ``torch.func.jacfwd``: ``"error"``, ``"different"`` or ``"same"``. (default: ``"error"``)
        holomorphic: as in :func:`jacrev`. (default: ``False``)

    Returns:
        A function returning the Jacobian (or ``(jacobian, aux)``).

    Example:
        >>> import torch, functx
        >>> functx.jacfwd(torch.sin)(torch.zeros(2))
        tensor([[1., 0.],
                [0., 1.]])
    """
    return _jacobian(
        func, argnums, has_aux, chunk_size, rev=False, api="jacfwd", randomness=randomness, holomorphic=holomorphic
    )


def _jacobian(
    func: Callable[..., Any],
    argnums: Any,
    has_aux: bool,
    chunk_size: Any,
    *,
    rev: bool,
    api: str,
    randomness: str = "error",
    holomorphic: bool = False,
) -> Callable[..., Any]:
    check_callable(func, "func", api)
    check_bool(holomorphic, "holomorphic", api)
    check_choice(randomness, "randomness", ("error", "different", "same"), api)
    argnums = check_argnums(argnums, api)
    check_bool(has_aux, "has_aux", api)
    chunk_size = check_chunk_size(chunk_size, api)

    options = {"has_aux": has_aux, "chunk_size": chunk_size, "randomness": randomness, "holomorphic": holomorphic}

    def jacobian_fn(*args: Any, **kwargs: Any) -> Any:
        call = Call(api, func, args, kwargs, argnums, has_aux, holomorphic=holomorphic)
        rev_here = rev or not call.leaves  # nothing to differentiate: an empty Jacobian in both modes
        torch_fn, outputs = call.fn("torch")
        # forward mode: torch.func.jvp would let `func` write the caller's tensors, so it gets copies
        with InplaceGuard(call, copy=not rev_here) as leaves:
            _, jac, aux = jacobian_flat(torch_fn, leaves, rev=rev_here, **options)
        return outputs.with_aux(outputs.unflatten([call.unflatten_in(resolved(row)) for row in jac]), aux)

    return functools.update_wrapper(jacobian_fn, func)
