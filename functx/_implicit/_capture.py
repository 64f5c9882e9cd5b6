"""What implicit differentiation must refuse at call time, read from torch.func internals.

* :func:`check_no_plain_duals`: ``torch.autograd.forward_ad`` dual numbers outside any
  functorch transform (the rules call ``torch.func.jvp``, which cannot open its own level
  inside a plain dual level).
* :class:`CaptureCheck`: tensors captured by closure whose derivatives would be lost. Inside
  a Function's ``forward`` every transform level of the caller is popped, so a captured
  tensor that a transform is differentiating (or vmapping) shows up as a wrapper of a
  level that is not live; a captured plain tensor with ``requires_grad=True`` is the
  eager-mode equivalent.

The private names come from :mod:`functx._torch_internals` (through :mod:`functx._solvers._functorch`); without them the checks
are skipped (a captured functorch wrapper is then not detected).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch.overrides import TorchFunctionMode

from .. import _torch_internals as ti
from .._solvers._functorch import jvp_levels, peel
from .._tree import tree_leaves
from .._validate import describe


def check_no_plain_duals(tensors: Sequence[torch.Tensor], api: str) -> None:
    """Refuse ``torch.autograd.forward_ad`` dual numbers (outside functorch transforms).

    The rules compute forward-mode products with ``torch.func.jvp``, which cannot open its
    own level inside a plain dual level; functx's and torch.func's forward transforms work.
    """
    if ti.forward_ad_level() < 0 or jvp_levels():
        return
    if any(fwAD.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(
            f"`functx.{api}`: torch.autograd.forward_ad dual numbers are not supported by implicit "
            f"differentiation; use `functx.jvp`/`functx.jacfwd` (or `torch.func.jvp`) instead."
        )


class CaptureCheck(TorchFunctionMode):
    """Watch a function's torch calls for captured tensors whose derivatives would be lost.

    A tensor argument of a torch call is *known* if it is an input of the function, the
    output of an earlier call, or a functorch wrapper (made by a transform inside the
    function) around a known tensor. Any other tensor was captured (closure or global): it
    is harmless as a constant, and reported in :attr:`offenders` when it carries
    derivatives: a plain tensor with ``requires_grad=True`` (eager autograd), or a
    ``grad``/``jvp`` wrapper made outside the function (an enclosing functorch transform;
    its level is popped while a Function's ``forward`` runs, and level numbers are reused,
    so the wrapper chain is what identifies it). Captured ``vmap``-batched tensors are fine:
    torch restores their level for the Function.
    """

    def __init__(self, inputs: Sequence[Any]) -> None:
        super().__init__()
        self._known = {id(t) for t in inputs if isinstance(t, torch.Tensor)}
        self._keep: list[Any] = list(inputs)  # keep ids unique while the mode is active
        self.offenders: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        unknown = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and id(t) not in self._known]
        out = func(*args, **kwargs)
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if outputs and func not in _CONSTANT_MAKERS:  # metadata reads and .detach() are harmless
            for t in unknown:
                self._inspect(t)
        for t in outputs:
            self._remember(t)
        return out

    def _remember(self, t: torch.Tensor) -> None:
        self._known.add(id(t))
        self._keep.append(t)

    def _inspect(self, t: torch.Tensor) -> None:
        self._remember(t)
        tracked, inner = False, t
        while (peeled := peel(inner)) is not None:
            inner, grad_wrapper = peeled
            tracked = tracked or grad_wrapper
            if id(inner) in self._known:
                return
        if tracked:
            self.offenders.append(f"{describe(t)} traced by an enclosing grad/jvp transform")
        elif inner.requires_grad:
            self.offenders.append(f"{describe(t)} with requires_grad=True")


_CONSTANT_MAKERS = (torch.Tensor.detach, torch.detach)
