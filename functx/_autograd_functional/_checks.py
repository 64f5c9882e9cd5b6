"""The original's checks, with its exception types and messages (user code matches them).

These deliberately keep `torch.autograd.functional`'s own wording instead of functx's grammar
(:mod:`functx._validate`): the module is a drop-in replacement, and code that catches the
original's messages must keep working. :func:`as_original` marks such an error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._tree import is_differentiable
from ._compute import STRATEGIES
from ._spec import Spec

Tensors = tuple[torch.Tensor, ...]


class Reroute(Exception):
    """Raised inside a functx computation to rerun the call with the original (``func``
    returned a complex output, whose conventions and errors are the original's)."""


def as_original(err: Exception) -> Exception:
    """Mark an error of these checks so that the adapter raises it as it is (instead of
    rerunning the original)."""
    err._functx_compat = True  # type: ignore[attr-defined]
    return err


def as_tuple(value: Any, name: str, api: str) -> tuple[bool, tuple[Any, ...]]:
    """``(was_tuple, value_as_tuple)``; every entry must be a Tensor."""
    is_tuple = isinstance(value, tuple)
    values = value if is_tuple else (value,)
    for i, entry in enumerate(values):
        if not isinstance(entry, torch.Tensor):
            where = f"value at index {i}" if is_tuple else f"given {name}"
            raise as_original(
                TypeError(
                    f"The {name} given to {api} must be either a Tensor or a tuple of Tensors but the"
                    f" {where} has type {type(entry)}."
                )
            )
    return is_tuple, values


def check_inputs(spec: Spec, inputs: Any) -> tuple[bool, Tensors]:
    """``inputs`` as the original checks them: Tensors of a differentiable dtype."""
    is_tuple, xs = as_tuple(inputs, "inputs", spec.name)
    for x in xs:
        if not is_differentiable(x):
            x.detach().requires_grad_(True)  # torch's own error, as the original raises it
    return is_tuple, xs


def parse_v(spec: Spec, v: Any, refs: Tensors, is_refs_tuple: bool) -> Tensors | None:
    """Validate ``v`` against the inputs ``refs`` (``jvp``, ``hvp``)."""
    if v is None:
        if len(refs) != 1 or refs[0].nelement() != 1:
            raise as_original(
                RuntimeError(
                    "The vector v can only be None if the input to the user-provided function "
                    "is a single Tensor with a single element."
                )
            )
        return None
    _, vs = as_tuple(v, "v", spec.name)
    if len(vs) != len(refs):
        if is_refs_tuple:
            raise as_original(RuntimeError(f"v is a tuple of invalid length: should be {len(refs)} but got {len(vs)}."))
        raise as_original(RuntimeError("The given v should contain a single Tensor."))
    for i, (t, ref) in enumerate(zip(vs, refs)):
        if t.size() != ref.size():
            entry = f"Entry {i} in " if is_refs_tuple else ""
            raise as_original(RuntimeError(f"{entry}v has invalid size: should be {ref.size()} but got {t.size()}."))
    return vs


def check_strategy(spec: Spec, strategy: Any) -> None:
    """The original's check of ``strategy`` (``jacobian``, with a hint) and
    ``outer_jacobian_strategy`` (``hessian``)."""
    if strategy not in STRATEGIES:
        hint = (
            ' Hint: If your function has more outputs than inputs, "forward-mode" tends to be more '
            'performant. Otherwise, prefer to use "reverse-mode".'
        )
        raise AssertionError(
            'Expected strategy to be either "forward-mode" or "reverse-mode".' + (hint if spec.strategy_hint else "")
        )


class Outputs:
    """``func`` returning a tuple of Tensors, or one scalar where ``spec.scalar_output``,
    after the original's checks of what it returns; records whether it returned a tuple.
    A complex output raises :class:`Reroute` (the original's conventions apply)."""

    def __init__(self, spec: Spec, func: Callable[..., Any], *, strict: bool = False) -> None:
        self.spec, self.func, self.strict = spec, func, strict
        self.is_tuple = False

    def __call__(self, *xs: torch.Tensor) -> Any:
        out = self.func(*xs)
        self.is_tuple, outs = as_tuple(out, "outputs of the user-provided function", self.spec.name)
        if any(o.is_complex() for o in outs):
            raise Reroute
        if self.strict:
            _check_requires_grad(outs)
        if not self.spec.scalar_output:
            return outs
        if self.is_tuple:
            raise as_original(RuntimeError(f"The function given to {self.spec.name} should return a single Tensor"))
        if out.nelement() != 1:
            raise as_original(
                RuntimeError(
                    f"The Tensor returned by the function given to {self.spec.name} should contain a single element"
                )
            )
        return out.reshape(()) if self.spec.scalar_reshape else out


def _check_requires_grad(outs: Tensors) -> None:
    for i, o in enumerate(outs):
        if not o.requires_grad:
            raise as_original(
                RuntimeError(
                    f"Output {i} of the user-provided function does not require gradients."
                    " The outputs must be computed in a differentiable manner from the input"
                    " when running in strict mode."
                )
            )
