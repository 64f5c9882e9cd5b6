"""One frozen :class:`Spec` per API of ``torch.autograd.functional``, and the routing policy.

Everything that differs between the six APIs is data here; the adapter
(:func:`functx._autograd_functional._engine.call`) reads it and never branches on an
API's name.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.functional as original

from ._compute import FORWARD_MODE, hessian, jacobian, jvp

#: ``jvp`` with fewer input elements than this runs the original double-backward trick:
#: below it ``torch.func``'s fixed per-call overhead costs more than forward mode saves
#: (the crossover is measured by ``benchmarks/bench_autograd_functional.py``; its numbers
#: live in docs/benchmarks.md).
JVP_FORWARD_MODE_MIN_NUMEL = 2**14


class Engine(enum.Enum):
    """What computes a call."""

    ORIGINAL = "torch.autograd.functional's own function, unchanged"
    VHP = "the original vhp (reverse over reverse) with this API's checks and messages"
    FUNCTX = "functx's core (torch.func) on flat tuples of tensors"


class Level(enum.Enum):
    """A nesting level of a result: a tuple over the outputs or over the inputs, unwrapped
    when the user passed (or ``func`` returned) a single Tensor."""

    OUTPUTS = "outputs"
    INPUTS = "inputs"


class Strict(enum.Enum):
    """How ``strict=True`` is honoured."""

    ORIGINAL = "rerun the original, whose checks belong to its algorithm"
    OUTPUTS = "probe each output's connection to each input (jacobian)"
    GRADIENT = "probe the gradient's connection to each input (hessian)"


@dataclasses.dataclass(frozen=True)
class Spec:
    """How one API is served.

    Attributes:
        name: the API's name, as the original's messages spell it.
        original: the original function (called with the user's arguments unchanged).
        engine: the engine when nothing sends the call to the original.
        takes_v: ``v`` is shaped like ``inputs`` (validated with the original's checks;
            ``None`` only for a single one-element input).
        scalar_output: ``func`` must return one Tensor with a single element.
        scalar_reshape: that element is reshaped to ``()`` before differentiating.
        levels: the nesting of the (second) result, outermost first.
        pair: the result is ``(func_output, product)``.
        strict: how ``strict=True`` is honoured.
        min_numel: inputs with fewer elements go to the original (``jvp``).
        forward_lists: forward mode returns lists where the input level is kept, as the
            original's forward mode does.
        strategy_hint: the error for a bad ``strategy`` adds the original's hint.
        inputs_checked_first: ``inputs`` are type-checked before ``strategy`` (the
            original ``hessian``'s order).
        compute: the functx computation ``compute(fn, xs, tangents, strategy)``.
    """

    name: str
    original: Callable[..., Any]
    engine: Engine
    takes_v: bool = False
    scalar_output: bool = False
    scalar_reshape: bool = False
    levels: tuple[Level, ...] = ()
    pair: bool = False
    strict: Strict = Strict.ORIGINAL
    min_numel: int = 0
    forward_lists: bool = False
    strategy_hint: bool = False
    inputs_checked_first: bool = False
    compute: Callable[..., Any] | None = None


SPECS: dict[str, Spec] = {
    s.name: s
    for s in (
        # One backward pass (two for vhp) is already optimal; torch.func would only add
        # per-call overhead (measured in benchmarks/), so the originals run unchanged.
        Spec("vjp", original.vjp, Engine.ORIGINAL),
        Spec("vhp", original.vhp, Engine.ORIGINAL),
        # Reverse over reverse instead of the double-backward trick: the same numbers for
        # every function whose Hessian is symmetric, one backward pass fewer.
        Spec("hvp", original.hvp, Engine.VHP, takes_v=True, scalar_output=True, pair=True, levels=(Level.INPUTS,)),
        Spec(
            "jvp",
            original.jvp,
            Engine.FUNCTX,
            takes_v=True,
            levels=(Level.OUTPUTS,),
            pair=True,
            min_numel=JVP_FORWARD_MODE_MIN_NUMEL,
            compute=jvp,
        ),
        Spec(
            "jacobian",
            original.jacobian,
            Engine.FUNCTX,
            levels=(Level.OUTPUTS, Level.INPUTS),
            strict=Strict.OUTPUTS,
            forward_lists=True,
            strategy_hint=True,
            compute=jacobian,
        ),
        Spec(
            "hessian",
            original.hessian,
            Engine.FUNCTX,
            scalar_output=True,
            scalar_reshape=True,
            levels=(Level.INPUTS, Level.INPUTS),
            strict=Strict.GRADIENT,
            forward_lists=True,
            inputs_checked_first=True,
            compute=hessian,
        ),
    )
}


def route(spec: Spec, inputs: Any, strict: bool, strategy: str) -> Engine:
    """The engine for one call.

    * ``spec.engine``, unless one of the following sends the call to the original:
    * ``strict=True`` where the spec's ``strict`` is :attr:`Strict.ORIGINAL` (``jvp``,
      ``hvp``: the checks belong to the original's algorithm), or with forward mode
      (the original refuses the combination with its own error);
    * fewer input elements than ``spec.min_numel`` (``jvp``: below it ``torch.func``'s
      overhead costs more than forward mode saves);
    * a complex input: the original's conventions (and its errors, such as "grad can be
      implicitly created only for real scalar outputs") are kept exactly. Complex
      outputs are detected when ``func`` runs and rerun the original too.
    """
    if spec.engine is Engine.ORIGINAL:
        return Engine.ORIGINAL
    if strict and (spec.strict is Strict.ORIGINAL or strategy == FORWARD_MODE):
        return Engine.ORIGINAL
    tensors = _tensors(inputs)
    if sum(x.numel() for x in tensors) < spec.min_numel or any(x.is_complex() for x in tensors):
        return Engine.ORIGINAL
    return spec.engine


def _tensors(inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, tuple):
        return tuple(x for x in inputs if isinstance(x, torch.Tensor))
    return ()  # invalid: the checks raise the original's error
