"""Ensembles: :func:`stack` converts same-architecture modules for :func:`functx.vmap`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._validate import check_instance, fail
from ._module import FunctionalModule, check_training
from ._plan import Plan, TensorDict


def stack(
    modules: Sequence[nn.Module], /, *, training: bool | None = None
) -> tuple[FunctionalModule, TensorDict, TensorDict]:
    """Convert an ensemble of same-architecture modules for :func:`functx.vmap`.

    Args:
        modules: a non-empty list, tuple or ``nn.ModuleList`` of modules with the same
            submodule classes, names, shapes, dtypes and training flags (for example
            built by the same code with different seeds). The function runs the code of
            ``modules[0]`` (its non-tensor attributes are used for every member).
        training: as in :func:`make_functional`. (default: ``None``)

    Returns:
        ``(fmodel, stacked_params, stacked_buffers)``: ``fmodel`` as from
        :func:`make_functional` and dicts whose tensors have a new leading dimension of
        size ``len(modules)`` (detached copies). Map over it with
        ``functx.vmap(fmodel, in_dims=(0, 0, None))``.

    Example:
        >>> import torch, functx.nn
        >>> members = [torch.nn.Linear(3, 2) for _ in range(4)]
        >>> fmodel, params, buffers = functx.nn.stack(members)
        >>> params["weight"].shape
        torch.Size([4, 2, 3])
        >>> x = torch.randn(5, 3)
        >>> out = functx.vmap(fmodel, in_dims=(0, 0, None))(params, buffers, x)
        >>> out.shape, torch.allclose(out[2], members[2](x), atol=1e-6)
        (torch.Size([4, 5, 2]), True)
    """
    check_instance(modules, (list, tuple, nn.ModuleList), "modules", "nn.stack", "a list or tuple of modules")
    modules = list(modules)
    if not modules:
        raise fail("nn.stack", "`modules` must not be empty, got []; pass at least one module.")
    check_instance(modules[0], nn.Module, "modules[0]", "nn.stack", "a torch.nn.Module")
    training = check_training(training, "stack")
    same_structure(modules, training is None, "stack")
    fmodel = FunctionalModule(Plan(modules[0], "stack"), training)
    members_p = [dict(m.named_parameters()) for m in modules]
    members_b = [dict(m.named_buffers()) for m in modules]
    params = {n: torch.stack([p[n].detach() for p in members_p]) for n in fmodel.param_names}
    buffers = {n: torch.stack([b[n].detach() for b in members_b]) for n in fmodel.buffer_names}
    return fmodel, params, buffers


def same_structure(modules: Sequence[nn.Module], flags: bool, api: str) -> None:
    """``modules`` have the same submodule classes, names, shapes, dtypes (and training
    flags, if ``flags``)."""
    sig = _signature(modules[0], flags)
    for i, m in enumerate(modules[1:], 1):
        check_instance(m, nn.Module, f"modules[{i}]", f"nn.{api}", "a torch.nn.Module")
        other = _signature(m, flags)
        for what, a, b in zip(("submodules (path, class[, training])", "parameters", "buffers"), sig, other):
            if a != b:
                diff = next((f"{x} vs {y}" for x, y in zip(a, b) if x != y), f"{len(a)} vs {len(b)} entries")
                raise ValueError(
                    f"`functx.nn.{api}`: modules[{i}] differs from modules[0] in its {what}: {diff}. "
                    f"Stacked modules must be copies of one architecture (e.g. built by the same code)."
                )


def _signature(m: nn.Module, flags: bool) -> tuple[list[Any], list[Any], list[Any]]:
    mods = [(p, type(s).__name__) + ((s.training,) if flags else ()) for p, s in m.named_modules()]
    params = [(n, tuple(t.shape), t.dtype) for n, t in m.named_parameters()]
    bufs = [(n, tuple(t.shape), t.dtype) for n, t in m.named_buffers()]
    return mods, params, bufs
