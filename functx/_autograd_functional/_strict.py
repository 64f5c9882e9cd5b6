"""``strict=True`` for ``jacobian``/``hessian``: graph connectivity, which only plain
autograd can see, checked before functx's vectorized computation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._checks import Outputs, Tensors, as_original
from ._spec import Spec, Strict


def strict_probe(spec: Spec, func: Callable[..., Any], xs: Tensors, create_graph: bool, vectorize: bool) -> None:
    """Raise the error the original ``jacobian``/``hessian`` raises with ``strict=True``.

    The original checks every Jacobian row; connectivity and ``requires_grad`` are the
    same for every element of an output (its backward runs through the same graph), so one
    row per output suffices: one forward and one backward per output (per input for
    ``hessian``), against the original's one backward per output element.
    """
    fn = Outputs(spec, func, strict=True)
    with torch.enable_grad():
        leaves = tuple(x.detach().requires_grad_(True) for x in xs)
        outs = _strict_gradient(fn, leaves) if spec.strict is Strict.GRADIENT else fn(*leaves)
        if vectorize:
            raise as_original(
                RuntimeError(
                    "torch.autograd.functional.jacobian: `strict=True` and `vectorized=True` are not "
                    "supported together. Please either set `strict=False` or `vectorize=False`."
                )
            )
        _check_rows(outs, leaves, create_graph)


def _check_rows(outs: Tensors, leaves: Tensors, create_graph: bool) -> None:
    """One Jacobian row per output: the original's errors for a missing connection."""
    for i, out in enumerate(outs):
        if out.nelement() == 0:
            continue
        grads = torch.autograd.grad(
            out.reshape(-1)[0], leaves, retain_graph=True, create_graph=create_graph, allow_unused=True
        )
        for j, g in enumerate(grads):
            if g is None:
                raise as_original(
                    RuntimeError(
                        f"Output {i} of the user-provided function is independent of input {j}. "
                        "This is not allowed in strict mode."
                    )
                )
            if create_graph and not g.requires_grad:
                raise as_original(
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
            raise as_original(
                RuntimeError(
                    "While computing the hessian, found that the jacobian of the user-provided"
                    f" function with respect to input {i} is independent of the input. This is not"
                    " allowed in strict mode. You should ensure that your function is twice"
                    " differentiable and that the jacobian depends on the inputs (this would be"
                    " violated by a linear function for example)."
                )
            )
    return jac
