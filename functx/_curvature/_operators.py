"""Curvature operators over a dataset: the Hessian, the generalised Gauss-Newton matrix and the
empirical Fisher of ``L = sum_b w_b l_b`` (see :mod:`._losses` for the scaling).

Every product runs plain ``torch.autograd`` on one graph per batch (the fastest eager path:
no per-operation functorch dispatch), sums the batch contributions into one flat ``(K, P)``
buffer and reduces it once over the process group. A matrix ``(P, K)`` is applied in one
pass per batch with ``is_grads_batched`` (a vmap over the backward pass).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from .._core import autograd_grad, plain_eager
from .._torch_internals import is_exporting
from .._validate import check_bool, check_optional_int, describe, fail
from ._base import CurvatureOperatorBase
from ._data import Data
from ._distributed import (
    all_reduce_sum,
    check_same_across_ranks,
    flagged_ranks,
    global_count,
    on_every_rank,
    resolve_group,
)
from ._losses import LossSpec
from ._params import Layout, model_function

# Modules whose output in training mode is random or depends on the batch (the usual reasons a
# determinism check fails).
_TRAINING_SENSITIVE = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase, nn.RReLU)


class EmpiricalRisk:
    """The data side every operator over a dataset shares: the model as a function of
    ``params``, the batches, ``N``, the process group and the construction-time checks (first
    batch, determinism). An operator calls :meth:`_init_data` from its ``__init__``."""

    _api: str
    _layout: Layout
    _num_data: int

    def _init_data(
        self,
        model: Any,
        loss: Any,
        params: Any,
        data: Any,
        *,
        reduction: str | None,
        num_data: int | None,
        batch_size_fn: Callable[[Any], int] | None,
        check_deterministic: bool,
        progress: bool,
        group: Any,
    ) -> None:
        api = self._api
        if torch.is_inference_mode_enabled():
            raise fail(
                api,
                "the operator must be built outside torch.inference_mode(), got a call inside it: its construction "
                "differentiates the loss (the determinism check). Build it outside; its products may then run "
                "inside inference mode.",
                RuntimeError,
            )
        self._loss = LossSpec(loss, reduction, api)
        self._layout = Layout(params, api, model=model)
        self._model = model
        self._forward, self._stateful = model_function(model, self._layout, api)
        self._data = Data(data, batch_size_fn, self._layout.device, progress, api)
        check_bool(check_deterministic, "check_deterministic", api)
        _check_num_data(num_data, api)
        self._group = resolve_group(group, api)
        check_same_across_ranks(self._layout.signature(), self._group, api)
        # a local failure (a bad batch) raises on every rank, not a hang
        on_every_rank(self._check_first_batch, self._group, api, "checking the first batch of `data`")
        if num_data is None:
            num_data = global_count(
                on_every_rank(self._data.count, self._group, api, "counting the samples of `data`"), self._group
            )
        self._num_data = num_data
        if self._num_data == 0:
            raise fail(api, "`data` must hold at least one sample (the curvature is undefined), got none.")
        if check_deterministic:
            self._check_deterministic()

    # -- construction-time checks -----------------------------------------------------------

    def _check_prediction(self, out: Any) -> None:
        """Checks on the model's prediction for the first batch (none here)."""

    def _check_first_batch(self) -> None:
        """Evaluate the model and the loss on the first non-empty batch (no backward pass), so
        that a loss of the wrong kind is named before any pass over the data."""
        for k, X, y, _ in self._data.indexed_batches("first batch", check_finite=True):
            leaves = [leaf.detach().requires_grad_() for leaf in self._layout.leaves]
            with torch.enable_grad():
                tree = self._layout.to_tree(leaves)
                out = self._forward(tree, X) if self._stateful is None else self._stateful(tree, X)[0]
                self._check_prediction(out)
                self._loss.value(out, y, k)
            return

    def _check_deterministic(self) -> None:
        what = "the determinism check (a pass over `data`)"
        first, second = (on_every_rank(self._loss_and_gradient, self._group, self._api, what) for _ in range(2))
        changed = sorted(set(first[2]) | set(second[2]))
        local = bool(changed) or not _close(first[0], second[0]) or not _close(first[1], second[1])
        ranks = flagged_ranks(local, self._group)
        if local:
            raise fail(self._api, _nondeterminism_message(getattr(self, "_model", None), changed))
        if ranks:
            raise fail(
                self._api,
                f"two passes over `data` must give the same loss and gradient (check_deterministic=True), got "
                f"different ones on rank(s) {ranks} of the process group (see their error).",
            )

    def _loss_and_gradient(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """``(sum_b a_b l_b, sum_b a_b grad l_b, updated buffers)`` with ``a_b = B_b`` ("mean") or 1;
        a non-finite loss or gradient raises, naming the batch."""
        total = torch.zeros((), dtype=self._layout.dtype, device=self._layout.device)
        grad = torch.zeros(self._layout.size, dtype=self._layout.dtype, device=self._layout.device)
        changed: set[str] = set()
        for k, X, y, size in self._data.indexed_batches("determinism check", check_finite=True):
            leaves = [leaf.detach().requires_grad_() for leaf in self._layout.leaves]
            with torch.enable_grad():
                tree = self._layout.to_tree(leaves)
                if self._stateful is not None:
                    out, updated = self._stateful(tree, X)
                    changed.update(updated)
                else:
                    out = self._forward(tree, X)
                value = self._loss.value(out, y, k)
                grads = autograd_grad([value], leaves)
            _check_finite(value, "the loss", k, self._api)
            flat = self._layout.ravel(grads)
            _check_finite(flat, "the gradient of the loss", k, self._api)
            a = size if self._loss.reduction == "mean" else 1
            total += a * value.detach()
            grad += a * flat
        return total, grad, sorted(changed)


class _CurvatureOperator(CurvatureOperatorBase, EmpiricalRisk):
    """The shared machinery; subclasses define ``_batch_product``."""

    def __init__(
        self,
        model: Any,
        loss: Any,
        params: Any,
        data: Any,
        *,
        reduction: str | None = None,
        num_data: int | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        check_deterministic: bool = True,
        progress: bool = False,
        group: Any = None,
    ) -> None:
        self._api = f"functx.curvature.{type(self).__name__}"
        self._init_data(
            model,
            loss,
            params,
            data,
            reduction=reduction,
            num_data=num_data,
            batch_size_fn=batch_size_fn,
            check_deterministic=check_deterministic,
            progress=progress,
            group=group,
        )

    # -- products ----------------------------------------------------------------------------

    def _matmul_flat(self, v: torch.Tensor) -> torch.Tensor:
        """A product differentiable in ``v`` (the operator is linear and symmetric: the
        derivative of ``A v`` is ``A`` itself), under plain autograd, forward-mode AD and the
        functx/torch.func transforms; the data pass itself always runs eager autograd."""
        v = self._check_flat(v)
        self._refuse_compilation()
        if not v.requires_grad and plain_eager(v) and fwAD.unpack_dual(v).tangent is None:
            return self._plain_product(v)  # nothing to differentiate: skip the Function's dispatch
        return _Product.apply(self, v)  # type: ignore[no-any-return]

    def _plain_product(self, v: torch.Tensor) -> torch.Tensor:
        """The product of a plain tensor ``v`` (no transform, no graph)."""
        return super()._matmul_flat(v.detach())

    def _refuse_compilation(self) -> None:
        if torch.compiler.is_compiling() or is_exporting() or torch.jit.is_tracing():
            raise fail(
                self._api,
                "products run eager autograd over the data; they cannot be compiled, exported or traced "
                "(got a product under torch.compile, torch.export or jit tracing).",
                TypeError,
            )

    def _check_v(self, v: torch.Tensor) -> None:
        # Direct products reach here with a plain, detached v (from _Product); a composite
        # (A + B, c * A, A @ B) calls it with the caller's v.
        self._refuse_compilation()
        if not plain_eager(v) or v.requires_grad:
            raise fail(
                self._api,
                "`v` must be a plain tensor that does not require grad for a composite operator (A + B, c * A, "
                "A @ B, an inverse) made with this operator, got a product that would be detached: composites "
                "cannot run inside a functx/torch.func transform or torch.compile. Products run eager autograd "
                "over the data: apply the operators separately (A @ v + B @ v), which is differentiable in v.",
                TypeError,
            )

    def _apply(self, V: torch.Tensor) -> torch.Tensor:
        """``(A V^T)^T`` for ``V`` of shape ``(K, P)``: one pass, one reduction (also inside
        inference mode, which is left for the data pass)."""
        with torch.inference_mode(False):
            V = V.clone() if V.is_inference() else V.detach()
            K, batched = V.shape[0], V.shape[0] > 1
            pieces = self._layout.split(V)
            vectors = [p.contiguous() for p in pieces] if batched else [p[0] for p in pieces]  # dense: fast vmap
            acc = torch.zeros(K, self.shape[0], dtype=self.dtype, device=self.device)
            accs = self._layout.split(acc)  # views into acc, one per parameter: no concatenation at the end
            leaves = [leaf.detach().requires_grad_() for leaf in self._layout.leaves]  # ours, never the user's
            for X, y, size in self._data.batches("product"):
                with torch.enable_grad():
                    products, alpha = self._batch_product(leaves, X, y, size, vectors, batched)
                for a, p in zip(accs, products):
                    a.add_(p.reshape(a.shape), alpha=alpha)
            return all_reduce_sum(acc, self._group, same=V, api=self._api)  # also checks every rank used this V

    def _batch_product(
        self, leaves: list[torch.Tensor], X: Any, y: Any, size: int, vectors: list[torch.Tensor], batched: bool
    ) -> tuple[tuple[torch.Tensor, ...], float]:
        raise NotImplementedError


class _Product(torch.autograd.Function):
    """``A v`` as a function of ``v``: linear and symmetric, so its vector-Jacobian product is
    ``A g``, its Jacobian-vector product ``A t``, and a vmap over ``v`` one matrix product."""

    @staticmethod
    def forward(op: _CurvatureOperator, v: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return op._plain_product(v)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.op = inputs[0]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:  # type: ignore[override]
        return None, _Product.apply(ctx.op, grad)

    @staticmethod
    def jvp(ctx: Any, _op_tangent: Any, tangent: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _Product.apply(ctx.op, tangent)  # type: ignore[no-any-return]

    @staticmethod
    def vmap(info: Any, in_dims: tuple[Any, ...], op: _CurvatureOperator, v: torch.Tensor) -> tuple[torch.Tensor, Any]:
        dim = in_dims[1]
        if dim is None:
            return _Product.apply(op, v), None
        moved = v.movedim(dim, -1)  # (P, B) or (P, K, B): one (P, K * B) product
        out = _Product.apply(op, moved.reshape(moved.shape[0], -1))
        return out.reshape(moved.shape), moved.ndim - 1


def _nondeterminism_message(model: Any, changed: list[str]) -> str:
    """Name what made two passes differ: a module in training mode, updated buffers, or
    (when the model shows neither) the data pipeline."""
    start = "two passes over `data` must give the same loss and gradient (check_deterministic=True), got "
    skip = " Pass check_deterministic=False to skip this check."
    modules = []
    if isinstance(model, nn.Module):
        modules = [
            f"{name!r} ({type(m).__name__})"
            for name, m in model.named_modules()
            if m.training and isinstance(m, _TRAINING_SENSITIVE)
        ]
    if modules or changed:
        what = []
        if modules:
            what.append(f"the module(s) {', '.join(modules)} in training mode")
        if changed:
            what.append(f"a forward that updates the buffer(s) {changed}")
        return (
            f"{start}different ones: the model has {' and '.join(what)}. Call model.eval() before building "
            f"the operator.{skip}"
        )
    return (
        f"{start}different ones, from a model without modules in training mode. Likely causes: random data "
        f"augmentation, a DataLoader that drops a different last batch each pass (shuffle=True with "
        f"drop_last=True; shuffling alone is harmless: the curvature is a sum over the samples), randomness "
        f"inside the model or the loss.{skip}"
    )


def _check_num_data(num_data: Any, api: str) -> None:
    """``None`` or a positive ``int`` (``num_data``); kept for the operators built beside these."""
    check_optional_int(num_data, "num_data", api, minimum=1)


def _check_finite(t: torch.Tensor, what: str, k: int, api: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise fail(api, f"batch {k} of `data` must give a finite loss and gradient, got a nan or inf in {what}.")


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = max(float(a.abs().max()) if a.numel() else 0.0, float(b.abs().max()) if b.numel() else 0.0, 1e-30)
    return bool(torch.allclose(a, b, rtol=5e-5, atol=1e-6 * scale))


class HessianOperator(_CurvatureOperator):
    """The Hessian of the dataset loss ``L = sum_b w_b l_b``: ``H = d^2 L / d params^2``.

    ``w_b = B_b / N`` for ``reduction="mean"`` and ``1`` for ``"sum"``, with ``l_b`` the loss
    of batch ``b`` and ``N`` the number of samples (curvlinops' convention: for the three
    loss modules this is the loss of the whole dataset taken as one batch).

    Args:
        model: an ``nn.Module`` (evaluated through :func:`functx.nn.make_functional`:
            parameters outside ``params`` and buffers are held at their values, the
            module is never written) or a callable ``model(params, X) -> prediction``.
        loss: ``nn.CrossEntropyLoss``, ``nn.MSELoss``, ``nn.BCEWithLogitsLoss`` (closed-form
            output Hessians), another loss module, or a callable ``loss(prediction, y)``.
        params: a dict name -> tensor (for a module: a subset of ``named_parameters()``,
            at whose values the curvature is taken); any pytree for a callable model.
        data: a re-iterable of ``(X, y)`` batches (a list, a ``DataLoader``); under
            ``torch.distributed``, this process's shard.
        reduction: ``"mean"`` or ``"sum"``: required for a callable ``loss``.
            (default: the loss module's ``reduction``)
        num_data: the number of samples ``N`` over all processes. (default: counted in
            one pass over ``data``)
        batch_size_fn: ``X -> int``, the number of samples of a batch whose ``X`` is not a
            tensor (a dict of tensors). (default: ``X.shape[0]``)
        check_deterministic: at construction, evaluate the loss and gradient twice and
            raise ``ValueError`` when they differ, naming the modules in training mode
            (dropout, BatchNorm) or the buffers the forward updates; random augmentation and
            a loader that drops a different last batch each pass also fail it (shuffling
            alone does not: the curvature is a sum over the samples). Each batch's ``X``,
            ``y``, loss and gradient must be finite. (default: ``True``)
        progress: a tqdm progress bar over the batches of each pass (when tqdm is
            installed). (default: ``False``)
        group: the ``torch.distributed`` process group products reduce over. (default:
            the world group when ``torch.distributed`` is initialised, else none)

    Construction evaluates the model and the loss on the first batch (a loss class instead of
    an instance, a loss returning a vector, a number or a detached tensor is named there),
    counts the samples and runs the determinism check; batches of size 0 are skipped, and a
    nan or inf in a batch's ``X`` or ``y`` raises a ``ValueError`` naming the batch. It must
    run outside :func:`torch.inference_mode` (products may run inside it). Products ``H @ v``
    are differentiable in ``v`` (their derivative is ``H``: the operator is linear and
    symmetric) under autograd, forward-mode AD and every functx/torch.func transform
    (``grad``, ``vjp``, ``jvp``, ``vmap``, ``jacrev``, ``jacfwd``, ``hessian``); a composite
    (``H + G``, ``c * H``, ``H @ G``) refuses a ``v`` that requires grad or a transform with
    a ``TypeError``, and no product can be compiled.

    Example:
        >>> import torch, functx, functx.curvature as fc
        >>> model = torch.nn.Linear(3, 1, bias=False)
        >>> X, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> H = fc.HessianOperator(model, torch.nn.MSELoss(reduction="sum"), dict(model.named_parameters()),
        ...                        [(X[:5], y[:5]), (X[5:], y[5:])])
        >>> H.shape
        (3, 3)
        >>> torch.allclose(H.to_dense(), 2 * X.T @ X, atol=1e-5)
        True
        >>> v = torch.randn(3)
        >>> torch.allclose(functx.grad(lambda v: v @ (H @ v))(v), 2 * (H @ v))  # d(v^T H v)/dv = 2 H v
        True
    """

    def _batch_product(
        self, leaves: list[torch.Tensor], X: Any, y: Any, size: int, vectors: list[torch.Tensor], batched: bool
    ) -> tuple[tuple[torch.Tensor, ...], float]:
        value = self._loss.fn(self._forward(self._layout.to_tree(leaves), X), y)
        grads = autograd_grad([value], leaves, create_graph=True)
        products = autograd_grad(grads, leaves, vectors, is_grads_batched=batched)
        return products, self._loss.weight(size, self._num_data)


class _OuterProductOperator(_CurvatureOperator):
    """``sum_b alpha_b J_b^T M_b J_b`` with ``J_b`` the Jacobian of the batch's prediction."""

    def _check_prediction(self, out: Any) -> None:
        if not isinstance(out, torch.Tensor):
            raise fail(self._api, f"the model's prediction must be a tensor, got {describe(out)}.", TypeError)

    def _batch_product(
        self, leaves: list[torch.Tensor], X: Any, y: Any, size: int, vectors: list[torch.Tensor], batched: bool
    ) -> tuple[tuple[torch.Tensor, ...], float]:
        out = self._forward(self._layout.to_tree(leaves), X)
        self._check_prediction(out)
        dual = torch.zeros_like(out, requires_grad=True)
        transposed = autograd_grad([out], leaves, [dual], create_graph=True)
        (jv,) = autograd_grad(transposed, [dual], vectors, retain_graph=True, is_grads_batched=batched)
        middle, alpha = self._middle(out, y, jv, size, batched)
        return autograd_grad([out], leaves, [middle], is_grads_batched=batched), alpha

    def _middle(
        self, out: torch.Tensor, y: Any, jv: torch.Tensor, size: int, batched: bool
    ) -> tuple[torch.Tensor, float]:
        raise NotImplementedError


class GGNOperator(_OuterProductOperator):
    """The generalised Gauss-Newton matrix ``G = sum_b w_b J_b^T (d^2 l_b / d f^2) J_b``.

    ``J_b`` is the Jacobian of the batch's prediction ``f`` with respect to ``params`` and
    ``w_b`` the batch weight of :class:`HessianOperator` (``H = G`` plus the terms with the
    model's second derivatives). The output Hessian is in closed form for the three loss
    modules and by autodiff for others. Arguments as for :class:`HessianOperator`.

    Example:
        >>> import torch, functx.curvature as fc
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> X, y = torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])
        >>> G = fc.GGNOperator(model, torch.nn.CrossEntropyLoss(), dict(model.named_parameters()), [(X, y)])
        >>> G.shape
        (26, 26)
        >>> bool(torch.linalg.eigvalsh(G.to_dense()).min() > -1e-6)  # positive semi-definite
        True
    """

    def _middle(
        self, out: torch.Tensor, y: Any, jv: torch.Tensor, size: int, batched: bool
    ) -> tuple[torch.Tensor, float]:
        return self._loss.output_hessian_product(out, y, jv, batched), self._loss.weight(size, self._num_data)


class EFOperator(_OuterProductOperator):
    """The empirical Fisher ``F = c * sum_n g_n g_n^T``.

    ``g_n`` is the gradient with respect to ``params`` of the sum-reduced loss of row ``n``:
    a sample, or one position of a sequence prediction for the loss modules (curvlinops'
    ``EFLinearOperator``); ``c`` is ``1`` for ``reduction="sum"`` and, for ``"mean"``, one
    over the number of terms the dataset loss averages (``N`` for ``CrossEntropyLoss``,
    ``N * C`` for ``MSELoss``/``BCEWithLogitsLoss`` over ``C`` output entries; ``N`` for a
    callable loss, whose "mean" is taken as the mean over the samples of a batch).
    Arguments as for :class:`HessianOperator`.

    Example:
        >>> import torch, functx.curvature as fc
        >>> model = torch.nn.Linear(2, 1)
        >>> X, y = torch.randn(4, 2), torch.randn(4, 1)
        >>> F = fc.EFOperator(model, torch.nn.MSELoss(), dict(model.named_parameters()), [(X, y)])
        >>> F.shape
        (3, 3)
        >>> bool(torch.linalg.eigvalsh(F.to_dense()).min() > -1e-6)
        True
    """

    def _middle(
        self, out: torch.Tensor, y: Any, jv: torch.Tensor, size: int, batched: bool
    ) -> tuple[torch.Tensor, float]:
        u = self._loss.output_gradient(out, y)
        dims = tuple(d + 1 for d in self._loss.row_dims(out)) if batched else self._loss.row_dims(out)
        inner = (u * jv).sum(dim=dims, keepdim=True) if dims else u * jv
        return u * inner, self._loss.ef_scale(out, size, self._num_data)
