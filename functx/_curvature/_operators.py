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

from .._core import plain_eager
from ._base import CurvatureOperatorBase
from ._data import Data
from ._distributed import (
    all_reduce_sum,
    any_rank,
    check_same_across_ranks,
    global_count,
    on_every_rank,
    resolve_group,
)
from ._losses import LossSpec
from ._params import Layout, model_function


class _CurvatureOperator(CurvatureOperatorBase):
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
        api = self._api = f"functx.curvature.{type(self).__name__}"
        self._loss = LossSpec(loss, reduction, api)
        self._layout = Layout(params, api)
        self._forward, self._stateful = model_function(model, self._layout, api)
        self._data = Data(data, batch_size_fn, self._layout.device, progress, api)
        if not isinstance(check_deterministic, bool):
            raise TypeError(f"`{api}`: `check_deterministic` must be True or False, got {check_deterministic!r}.")
        _check_num_data(num_data, api)
        self._group = resolve_group(group, api)
        check_same_across_ranks(self._layout.signature(), self._group, api)
        if num_data is None:  # a local failure (a bad batch) raises on every rank, not a hang
            num_data = global_count(
                on_every_rank(self._data.count, self._group, api, "counting the samples of `data`"), self._group
            )
        self._num_data = num_data
        if self._num_data == 0:
            raise ValueError(f"`{api}`: `data` holds no sample (an empty dataset); the curvature is undefined.")
        if check_deterministic:
            self._check_deterministic()

    # -- products ----------------------------------------------------------------------------

    def _apply(self, V: torch.Tensor) -> torch.Tensor:
        """``(A V^T)^T`` for ``V`` of shape ``(K, P)``: one pass, one reduction."""
        V = V.detach()
        K, batched = V.shape[0], V.shape[0] > 1
        pieces = self._layout.split(V)
        vectors = [p.contiguous() for p in pieces] if batched else [p[0] for p in pieces]  # dense: fast vmap
        accs = [torch.zeros(K, *s, dtype=self.dtype, device=self.device) for s in self._layout.shapes]
        for X, y, size in self._data.batches("product"):
            leaves = [leaf.detach().requires_grad_() for leaf in self._layout.leaves]
            with torch.enable_grad():
                products, alpha = self._batch_product(leaves, X, y, size, vectors, batched)
            for a, p in zip(accs, products):
                if p is not None:
                    a.add_(p.reshape(a.shape), alpha=alpha)
        acc = torch.cat([a.reshape(K, -1) for a in accs], dim=1)
        return all_reduce_sum(acc, self._group, same=V, api=self._api)  # also checks every rank used this V

    def _batch_product(
        self, leaves: list[torch.Tensor], X: Any, y: Any, size: int, vectors: list[torch.Tensor], batched: bool
    ) -> tuple[tuple[torch.Tensor | None, ...], float]:
        raise NotImplementedError

    def _check_v(self, v: torch.Tensor) -> None:
        if not plain_eager(v) or torch.is_inference_mode_enabled():
            raise TypeError(
                f"`{self._api}`: products run eager autograd over the data; they cannot run inside a "
                f"functx/torch.func transform, torch.compile or inference mode."
            )

    # -- construction-time checks -----------------------------------------------------------

    def _check_deterministic(self) -> None:
        what = "the determinism check (a pass over `data`)"
        first, second = (on_every_rank(self._loss_and_gradient, self._group, self._api, what) for _ in range(2))
        local = first[2] or second[2] or not _close(first[0], second[0]) or not _close(first[1], second[1])
        if any_rank(bool(local), self._group):
            raise ValueError(
                f"`{self._api}`: two passes over `data` gave different losses or gradients, or the model's forward "
                f"updates its buffers (check_deterministic=True). Likely causes: dropout or BatchNorm in training "
                f"mode (call model.eval() before building the operator), a shuffling DataLoader (shuffle=False), "
                f"random data augmentation. Pass check_deterministic=False to skip this check."
            )

    def _loss_and_gradient(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """``(sum_b a_b l_b, sum_b a_b grad l_b, buffers_changed)`` with ``a_b = B_b`` ("mean") or 1."""
        leaves = [leaf.detach().requires_grad_() for leaf in self._layout.leaves]
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        grad = torch.zeros(self._layout.size, dtype=self.dtype, device=self.device)
        changed = False
        for X, y, size in self._data.batches("determinism check"):
            with torch.enable_grad():
                tree = self._layout.to_tree(leaves)
                if self._stateful is not None:
                    out, updated = self._stateful(tree, X)
                    changed = changed or updated
                else:
                    out = self._forward(tree, X)
                value = self._loss.fn(out, y)
                grads = torch.autograd.grad(value, leaves, allow_unused=True)
            a = size if self._loss.reduction == "mean" else 1
            total += a * value.detach()
            grad += a * _cat(grads, leaves)
        return total, grad, changed


def _cat(grads: tuple[torch.Tensor | None, ...], like: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(torch.zeros_like(x) if g is None else g).reshape(-1) for g, x in zip(grads, like)])


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = max(float(a.abs().max()) if a.numel() else 0.0, float(b.abs().max()) if b.numel() else 0.0, 1e-30)
    return bool(torch.allclose(a, b, rtol=5e-5, atol=1e-6 * scale))


def _check_num_data(num_data: Any, api: str) -> None:
    if num_data is None:
        return
    if isinstance(num_data, bool) or not isinstance(num_data, int):
        raise TypeError(f"`{api}`: `num_data` must be an int or None, got {type(num_data).__name__}.")
    if num_data <= 0:
        raise ValueError(f"`{api}`: `num_data` must be a positive int (the number of samples), got {num_data}.")


def _grad(
    outputs: list[torch.Tensor],
    inputs: list[torch.Tensor],
    grad_outputs: list[torch.Tensor],
    batched: bool,
    graph: bool = False,
    retain: bool = False,
) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad`` that skips outputs outside the graph (their products are zero)."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and o.requires_grad]
    if not pairs:
        return (None,) * len(inputs)
    return torch.autograd.grad(
        [o for o, _ in pairs],
        inputs,
        [g for _, g in pairs],
        create_graph=graph,
        retain_graph=retain,
        allow_unused=True,
        is_grads_batched=batched,
    )


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
            raise ``ValueError`` when they differ (dropout, train-mode BatchNorm, shuffling,
            augmentation). (default: ``True``)
        progress: a tqdm progress bar over the batches of each pass (when tqdm is
            installed). (default: ``False``)
        group: the ``torch.distributed`` process group products reduce over. (default:
            the world group when ``torch.distributed`` is initialised, else none)

    Example:
        >>> import torch, functx.curvature as fc
        >>> model = torch.nn.Linear(3, 1, bias=False)
        >>> X, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> H = fc.HessianOperator(model, torch.nn.MSELoss(reduction="sum"), dict(model.named_parameters()),
        ...                        [(X[:5], y[:5]), (X[5:], y[5:])])
        >>> H.shape
        (3, 3)
        >>> torch.allclose(H.to_dense(), 2 * X.T @ X, atol=1e-5)
        True
    """

    def _batch_product(
        self, leaves: list[torch.Tensor], X: Any, y: Any, size: int, vectors: list[torch.Tensor], batched: bool
    ) -> tuple[tuple[torch.Tensor | None, ...], float]:
        value = self._loss.fn(self._forward(self._layout.to_tree(leaves), X), y)
        grads = torch.autograd.grad(value, leaves, create_graph=True, allow_unused=True)
        products = _grad(list(grads), leaves, vectors, batched)  # type: ignore[arg-type]
        return products, self._loss.weight(size, self._num_data)


class _OuterProductOperator(_CurvatureOperator):
    """``sum_b alpha_b J_b^T M_b J_b`` with ``J_b`` the Jacobian of the batch's prediction."""

    def _batch_product(
        self, leaves: list[torch.Tensor], X: Any, y: Any, size: int, vectors: list[torch.Tensor], batched: bool
    ) -> tuple[tuple[torch.Tensor | None, ...], float]:
        out = self._forward(self._layout.to_tree(leaves), X)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"`{self._api}`: the model's prediction must be a tensor, got {type(out).__name__}.")
        dual = torch.zeros_like(out, requires_grad=True)
        transposed = torch.autograd.grad(out, leaves, dual, create_graph=True, allow_unused=True)
        (jv,) = _grad(list(transposed), [dual], vectors, batched, retain=True)  # type: ignore[arg-type]
        if jv is None:
            return (None,) * len(leaves), 0.0
        middle, alpha = self._middle(out, y, jv, size, batched)
        return _grad([out], leaves, [middle], batched), alpha

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
