"""The functx computations behind the drop-in, on flat tuples of tensors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, get_args

import torch

from .._core import all_argnums
from .._hessian import HessianMode
from .._hessian import hessian as core_hessian
from .._jacobian import jacfwd, jacrev
from .._vjp_jvp import jvp as core_jvp

Tensors = tuple[torch.Tensor, ...]
#: The values of ``strategy`` / ``outer_jacobian_strategy`` (the original's).
Strategy = Literal["forward-mode", "reverse-mode"]
STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)
FORWARD_MODE = "forward-mode"


def jvp(fn: Callable[..., Any], xs: Tensors, vs: Tensors, strategy: str) -> Any:
    """``(outputs, J v)``: forward mode."""
    return core_jvp(fn, xs, vs)


def jacobian(fn: Callable[..., Any], xs: Tensors, vs: None, strategy: str) -> Any:
    """The Jacobian blocks, a tuple over outputs of tuples over inputs."""
    transform = jacfwd if strategy == FORWARD_MODE else jacrev
    return transform(fn, argnums=all_argnums(len(xs)))(*xs)


def hessian(fn: Callable[..., Any], xs: Tensors, vs: None, strategy: str) -> Any:
    """The Hessian blocks, a tuple over inputs of tuples over inputs."""
    mode: HessianMode = "fwd-rev" if strategy == FORWARD_MODE else "rev-rev"
    return core_hessian(fn, argnums=all_argnums(len(xs)), mode=mode)(*xs)
