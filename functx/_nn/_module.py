"""The public objects: :class:`FunctionalModule` and :func:`make_functional`.

How a call works: :func:`make_functional` analyses the module tree once into a
:class:`~functx._nn._plan.Plan`; a call checks the module did not change since
(``_plan``), resolves the given tensors (``_tensors``), clones the buffers (``_state``),
builds a per-call shallow copy of the tree holding them (``_copy``), runs the copied
root's ``forward`` and reports buffer updates (``_state``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._validate import check_optional_bool
from ._copy import build, check_no_parametrize_cache
from ._plan import Plan, TensorDict, check_fresh
from ._state import buffers_after, clones, state_before
from ._tensors import resolve


class FunctionalModule:
    """A module as a pure function of its tensors: ``fmodel(params, buffers, *args, **kwargs)``.

    Made by :func:`make_functional` or :func:`stack`; immutable and thread-safe. See
    :mod:`functx.nn` for the calling conventions.
    """

    __slots__ = ("_plan", "_training")

    def __init__(self, plan: Plan, training: bool | None) -> None:
        self._plan, self._training = plan, training

    def __call__(
        self,
        params: Mapping[str, torch.Tensor],
        buffers: Mapping[str, torch.Tensor] | None,
        /,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        """Run the module's forward with ``params`` and ``buffers``; return its output.

        Args:
            params: a dict with one tensor per parameter (or tied group), keyed by
                ``named_parameters()`` names.
            buffers: a dict with one tensor per buffer, keyed by ``named_buffers()``
                names (``{}`` or ``None`` for a module without buffers).
            *args: positional arguments of the module's ``forward``.
            **kwargs: keyword arguments of the module's ``forward`` (all of them: this
                call takes no options of its own).

        Returns:
            What the module's ``forward`` returns.

        Raises:
            ValueError: if the forward updated a buffer (BatchNorm in training mode):
                use :meth:`stateful` to receive the new buffers, or
                :meth:`with_training` ``(False)``.

        Example:
            >>> import torch, functx.nn
            >>> fmodel, params, buffers = functx.nn.make_functional(torch.nn.Linear(2, 1))
            >>> params = {"weight": torch.ones(1, 2), "bias": torch.zeros(1)}
            >>> fmodel(params, buffers, torch.tensor([[1.0, 2.0]]))
            tensor([[3.]])
        """
        out, _, changed = self._run(params, buffers, args, kwargs, "FunctionalModule.__call__")
        if changed:
            names = ", ".join(repr(self._plan.buffers.names[g]) for g in sorted(changed))
            raise ValueError(
                f"`functx.nn.FunctionalModule.__call__`: the forward updated buffer(s) {names} (as "
                f"BatchNorm does with its running statistics in training mode); the plain call never "
                f"drops an update. Use `out, new_buffers = fmodel.stateful(params, buffers, ...)`, or "
                f"evaluate in eval mode with `fmodel.with_training(False)`."
            )
        return out

    def stateful(
        self,
        params: Mapping[str, torch.Tensor],
        buffers: Mapping[str, torch.Tensor] | None,
        /,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[Any, TensorDict]:
        """Like calling ``fmodel``, also returning the buffers as the forward left them.

        Neither the module nor the tensors in ``buffers`` are written: the forward runs
        on clones of the buffers.

        Args:
            params: the parameters, as for ``fmodel(...)``.
            buffers: the buffers, as for ``fmodel(...)``.
            *args: positional arguments of the module's ``forward``.
            **kwargs: keyword arguments of the module's ``forward``.

        Returns:
            ``(out, new_buffers)``: ``new_buffers`` has one entry per buffer, keyed like
            the ``buffers`` returned by :func:`make_functional`, holding the values the
            forward left (new tensors, never the ones passed in).

        Example:
            >>> import torch, functx.nn
            >>> bn = torch.nn.BatchNorm1d(1, momentum=0.5)
            >>> fmodel, params, buffers = functx.nn.make_functional(bn, training=True)
            >>> out, new = fmodel.stateful(params, buffers, torch.tensor([[1.0], [3.0]]))
            >>> new["running_mean"], buffers["running_mean"]
            (tensor([1.]), tensor([0.]))
        """
        out, finals, _ = self._run(params, buffers, args, kwargs, "FunctionalModule.stateful")
        return out, dict(zip(self._plan.buffers.names, finals))

    def _run(
        self, params: Any, buffers: Any, args: tuple[Any, ...], kwargs: dict[str, Any], api: str
    ) -> tuple[Any, list[torch.Tensor], set[int]]:
        plan = self._plan
        check_fresh(plan, api)
        check_no_parametrize_cache(plan, api)
        p = resolve(plan.params, params, plan, api)
        given = resolve(plan.buffers, buffers, plan, api)
        cloned = clones(given)
        before = [state_before(c, b) for c, b in zip(cloned, given)]
        copies = build(plan, p, cloned, self._training)
        try:
            out = copies[0](*args, **kwargs)
        except RuntimeError as err:
            raise_batchnorm_hint(plan, self._training, err, api)
            raise_randomness_hint(plan, self._training, err, api)
            raise
        if not cloned:
            return out, cloned, set()
        return (out, *buffers_after(plan, copies, cloned, before))

    def with_training(self, training: bool | None) -> FunctionalModule:
        """The same function with every submodule in training (``True``) or eval (``False``)
        mode, or following the module's own flags (``None``). The module is not touched.

        Args:
            training: the mode to run in.

        Returns:
            A new :class:`FunctionalModule` sharing this one's analysis of the module.

        Example:
            >>> import torch, functx.nn
            >>> fmodel, params, buffers = functx.nn.make_functional(torch.nn.Dropout(0.5))
            >>> fmodel.with_training(False)(params, buffers, torch.ones(3))
            tensor([1., 1., 1.])
        """
        return FunctionalModule(self._plan, check_training(training, "FunctionalModule.with_training"))

    @property
    def training(self) -> bool | None:
        """The mode forced on every submodule, or ``None`` to follow the module's flags."""
        return self._training

    @property
    def param_names(self) -> tuple[str, ...]:
        """The keys of ``params``, as ``named_parameters()`` yields them."""
        return tuple(self._plan.params.names)

    @property
    def buffer_names(self) -> tuple[str, ...]:
        """The keys of ``buffers``, as ``named_buffers()`` yields them."""
        return tuple(self._plan.buffers.names)

    @property
    def trainable(self) -> frozenset[str]:
        """Names of the parameters whose ``requires_grad`` is currently set on the module;
        a filter for :func:`functx.nn.partition`."""
        return frozenset(n for n, p in self._plan.root.named_parameters() if p.requires_grad)

    def __repr__(self) -> str:
        plan = self._plan
        return (
            f"FunctionalModule({type(plan.root).__name__}, params={len(plan.params.names)}, "
            f"buffers={len(plan.buffers.names)}, training={self._training})"
        )


def check_training(training: Any, api: str) -> bool | None:
    return check_optional_bool(training, "training", f"nn.{api}")


def make_functional(
    module: nn.Module, /, *, training: bool | None = None
) -> tuple[FunctionalModule, TensorDict, TensorDict]:
    """Turn ``module`` into a pure function of its parameters and buffers.

    The module is analysed once and never written, not even temporarily: each call runs
    its ``forward`` (with hooks and parametrizations) on a per-call shallow copy holding
    the given tensors.

    Args:
        module: the ``torch.nn.Module`` to convert. Not scripted or compiled.
        training: run every submodule in training (``True``) or eval (``False``) mode,
            or follow the module's own flags at call time (``None``). (default: ``None``)

    Returns:
        ``(fmodel, params, buffers)``: the :class:`FunctionalModule`
        ``fmodel(params, buffers, *args, **kwargs)``, and dicts keyed by the
        ``named_parameters()`` / ``named_buffers()`` names holding the module's tensors
        detached (sharing storage, not requiring grad, plain tensors rather than
        ``Parameter`` objects). Tied tensors appear once, under their first name.

    Example:
        >>> import torch, functx.nn
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        >>> fmodel, params, buffers = functx.nn.make_functional(model)
        >>> sorted(params)
        ['0.bias', '0.weight', '2.bias', '2.weight']
        >>> x = torch.randn(5, 3)
        >>> torch.equal(fmodel(params, buffers, x), model(x))
        True
        >>> grads = functx.grad(lambda p: fmodel(p, buffers, x).sum())(params)
        >>> grads["2.weight"].shape
        torch.Size([1, 4])
    """
    fmodel = FunctionalModule(Plan(module, "make_functional"), check_training(training, "make_functional"))
    params = {n: t.detach() for n, t in module.named_parameters()}
    buffers = {n: t.detach() for n, t in module.named_buffers()}
    return fmodel, params, buffers


#: What torch's error says when a train-mode BatchNorm meets a batched input under
#: ``vmap`` with unbatched running statistics. Only used to choose a better message: if
#: torch words it otherwise, its own error passes through unchanged.
_BATCHNORM_VMAP_ERROR = "running_mean or running_var"


def raise_batchnorm_hint(plan: Plan, training: bool | None, err: RuntimeError, api: str) -> None:
    """Raise functx's ``ValueError`` for torch's error on a train-mode BatchNorm under
    ``vmap``; return if ``err`` is something else."""
    norms = [
        node.path or "<root>"
        for node in plan.nodes
        if node.norm
        and (node.module.training if training is None else training)
        and getattr(node.module, "track_running_stats", False)
    ]
    if not norms or _BATCHNORM_VMAP_ERROR not in str(err):
        return
    raise ValueError(
        f"`functx.nn.{api}`: normalization layer(s) {', '.join(repr(n) for n in norms)} run in training "
        f"mode under `vmap`, where they would update running statistics shared by every batch entry. "
        f"Evaluate in eval mode: `model.eval()` before `functx.nn.{plan.api}`, "
        f"`functx.nn.{plan.api}(model, training=False)`, or `fmodel.with_training(False)`. (Per-sample "
        f"BatchNorm in training mode is rarely meant: under `vmap` over samples each sample would be "
        f"normalized by its own statistics. For an ensemble, `functx.nn.stack` gives each member its "
        f"own stacked buffers: map over them with `in_dims=(0, 0, None)` and call `fmodel.stateful`.)"
    ) from err


#: What torch's error says when a random operation (Dropout in training mode) runs under
#: ``vmap(..., randomness="error")``. Only used to choose a better message.
_RANDOMNESS_VMAP_ERROR = "randomness error mode"


def raise_randomness_hint(plan: Plan, training: bool | None, err: RuntimeError, api: str) -> None:
    """Raise functx's error for torch's error on a random operation under ``vmap`` (Dropout
    in training mode), naming the layers and the ``randomness`` flag; return if ``err`` is
    something else."""
    if _RANDOMNESS_VMAP_ERROR not in str(err):
        return
    random = [
        node.path or "<root>"
        for node in plan.nodes
        if isinstance(node.module, _RANDOM_MODULES) and (node.module.training if training is None else training)
    ]
    layers = f"layer(s) {', '.join(repr(n) for n in random)}" if random else "a random operation"
    raise RuntimeError(
        f"`functx.nn.{api}`: {layers} run in training mode under `vmap`, whose default randomness='error' "
        f"refuses random operations. Pass `randomness='different'` to `functx.vmap` (independent "
        f"masks per batch entry: per-sample Dropout) or `randomness='same'` (one mask for the batch), "
        f"or evaluate without Dropout: `fmodel.with_training(False)`. (torch: {err})"
    ) from err


_RANDOM_MODULES = (nn.modules.dropout._DropoutNd, nn.RReLU)
