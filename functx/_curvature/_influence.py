"""Influence functions: ``score(q, t) = grad l_q^T  inverse  grad l_t`` for queries and training data.

Per-sample gradients come from ``functx.vmap(functx.grad(...))`` one batch at a time; the
query gradients are preconditioned once (``inverse @ G_q^T``), so scoring the training set
costs one per-sample-gradient pass and one matrix product per batch. Under
``torch.distributed`` each rank scores its shard of the training data and the columns are
gathered (one all-reduce), in rank order.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._tree import tree_flatten, tree_unflatten
from .._validate import check_bool, describe, fail
from ._base import square_operator
from ._data import Data
from ._distributed import all_reduce_sum, on_every_rank, resolve_group
from ._params import Layout, model_function

_API = "curvature.influence"


def influence(
    model: Any,
    loss: Any,
    params: Any,
    train: Any,
    queries: Any,
    inverse: Any,
    *,
    self_influence: bool = False,
    batch_size_fn: Callable[[Any], int] | None = None,
    progress: bool = False,
    group: Any = None,
) -> torch.Tensor:
    """Influence scores ``grad l_q^T  inverse  grad l_t`` of training examples on queries.

    ``l_n`` is the **sum-reduced** loss of example ``n`` alone (whatever the loss module's
    ``reduction``: a ``MSELoss(reduction="mean")`` over ``C`` outputs gives ``l_n`` = the sum
    of the ``C`` squared errors) and ``grad l_n`` its gradient with respect to ``params``,
    flattened as the curvature operators do. ``inverse`` is typically
    ``(G + damping I)^-1`` with ``G`` the curvature of the training loss (``K.inverse(damping)``,
    ``fc.InverseOperator(fc.GGNOperator(...), damping)``).

    Sign and scale (kronfluence's convention): no minus sign and no ``1/N``. A positive score
    means that up-weighting ``t`` lowers ``l_q`` (a helpful example). If ``inverse`` is the
    inverse Hessian of the **summed** training loss (plus any regulariser), the score
    approximates the increase of ``l_q`` when ``t`` is left out and the model retrained;
    with the Hessian of the **mean** loss (the operators' ``reduction="mean"``), divide the
    score by ``N`` for that (Koh & Liang's ``-I_up,loss`` is ``-score``).

    Args:
        model: an ``nn.Module`` (evaluated through :func:`functx.nn.make_functional`; never
            written) or a callable ``model(params, X) -> prediction``.
        loss: a ``torch.nn`` loss module (used with ``reduction="sum"``) or a callable
            ``loss(prediction, y)``, called on one example (a batch of one).
        params: a dict name -> tensor (for a module: a subset of ``named_parameters()``) or,
            for a callable model, any pytree of tensors.
        train: a re-iterable of ``(X, y)`` batches (a list, a ``DataLoader``); under
            ``torch.distributed``, this process's shard.
        queries: a re-iterable of ``(X, y)`` batches with the structure of ``train``'s
            (the same on every rank), or ``None`` with ``self_influence=True``.
        inverse: a symmetric ``(P, P)`` operator with ``shape`` and ``@`` on ``(P, K)``
            matrices, or a dense ``(P, P)`` tensor.
        self_influence: return ``grad l_t^T inverse grad l_t`` for every training example
            instead (``queries`` must be ``None``). Under ``torch.distributed`` each rank then
            applies ``inverse`` to its own gradients: ``inverse`` must need no collective
            (``K.inverse``, a tensor), unlike the pairwise scores, which apply it to the
            queries only. (default: ``False``)
        batch_size_fn: ``X -> int`` for batches whose ``X`` is not a tensor. (default:
            ``X.shape[0]``)
        progress: a tqdm progress bar over the training batches. (default: ``False``)
        group: the ``torch.distributed`` process group. (default: the world group when
            ``torch.distributed`` is initialised, else none)

    Returns:
        A ``(num_queries, num_train)`` tensor, or ``(num_train,)`` with ``self_influence``;
        under ``torch.distributed``, ``num_train`` counts every rank's examples, rank 0's first.

    Raises:
        TypeError: a bad ``model``, ``loss``, ``inverse``, ``self_influence`` or batches.
        ValueError: ``inverse`` is not ``(P, P)``; ``queries`` batches differ in structure or
            trailing shapes from ``train``'s; ``queries`` given with ``self_influence=True``
            or missing without it.

    Example:
        >>> import torch, functx.curvature as fc
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> params = dict(model.named_parameters())
        >>> X, y = torch.randn(6, 2), torch.randn(6, 1)
        >>> train, queries = [(X[:4], y[:4]), (X[4:], y[4:])], [(X[:2], y[:2])]
        >>> scores = fc.influence(model, torch.nn.MSELoss(), params, train, queries, torch.eye(2))
        >>> scores.shape
        torch.Size([2, 6])
        >>> self_scores = fc.influence(model, torch.nn.MSELoss(), params, train, None, torch.eye(2),
        ...                            self_influence=True)
        >>> torch.allclose(self_scores[:2], scores.diagonal(), atol=1e-6)
        True
    """
    api = f"functx.{_API}"
    layout = Layout(params, api, model=model)
    forward, _ = model_function(model, layout, api)
    check_bool(self_influence, "self_influence", _API)
    per_example = _per_example_loss(loss, forward, layout)
    apply_inverse = square_operator(inverse, "inverse", layout.size, _API)
    group = resolve_group(group, api)
    train_data = Data(train, batch_size_fn, layout.device, progress, api)
    if self_influence:
        if queries is not None:
            raise fail(_API, f"`queries` must be None with self_influence=True, got {describe(queries)}.")
        local = on_every_rank(
            lambda: _self_scores(train_data, per_example, layout, apply_inverse),
            group,
            api,
            "scoring this rank's `train`",
        )
        return _gather(local.unsqueeze(0), group)[0]
    if queries is None:
        raise fail(
            _API, "`queries` must be a re-iterable of (X, y) batches (None only with self_influence=True).", ValueError
        )
    query_data = Data(queries, batch_size_fn, layout.device, False, api)
    _check_like(train_data, query_data)
    Gq = torch.cat([_gradients(per_example, layout, X, y) for X, y, size in query_data.batches("queries") if size])
    preconditioned = apply_inverse(Gq.T).T  # (num_queries, P), once
    local = on_every_rank(
        lambda: _pair_scores(train_data, per_example, layout, preconditioned), group, api, "scoring this rank's `train`"
    )
    return _gather(local, group)


def _pair_scores(data: Data, per_example: Any, layout: Layout, preconditioned: torch.Tensor) -> torch.Tensor:
    columns = [
        preconditioned @ _gradients(per_example, layout, X, y).to(preconditioned.dtype).T
        for X, y, size in data.batches("train")
        if size
    ]
    return torch.cat(columns, dim=1) if columns else preconditioned.new_zeros(preconditioned.shape[0], 0)


def _self_scores(data: Data, per_example: Any, layout: Layout, apply_inverse: Any) -> torch.Tensor:
    scores = []
    for X, y, size in data.batches("train"):
        if not size:
            continue
        G = _gradients(per_example, layout, X, y)
        scores.append((apply_inverse(G.T).T * G).sum(1))
    return torch.cat(scores) if scores else torch.zeros(0, dtype=layout.dtype, device=layout.device)


def _gradients(per_example: Any, layout: Layout, X: Any, y: Any) -> torch.Tensor:
    """``(B, P)``: the flat gradients of the batch's per-example losses."""
    import functx

    with torch.enable_grad():
        grads = functx.vmap(functx.grad(per_example), in_dims=(None, 0, 0))(list(layout.leaves), X, y)
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)


def _per_example_loss(loss: Any, forward: Any, layout: Layout) -> Any:
    """``(leaves, x, y) -> l``: the sum-reduced loss of one example (a batch of one)."""
    if not callable(loss):
        raise fail(
            _API,
            f"`loss` must be a torch.nn loss module or a callable loss(prediction, y), got {describe(loss)}.",
            TypeError,
        )
    if isinstance(loss, nn.modules.loss._Loss) and getattr(loss, "reduction", "sum") != "sum":
        loss = copy.copy(loss)  # the user's module is not touched
        loss.reduction = "sum"

    def one(t: Any) -> Any:
        leaves, spec = tree_flatten(t)
        return tree_unflatten(spec, [leaf.unsqueeze(0) for leaf in leaves])

    def per_example(leaves: list[torch.Tensor], x: Any, y: Any) -> torch.Tensor:
        return loss(forward(layout.to_tree(leaves), one(x)), one(y))

    return per_example


def _signature(data: Data, what: str) -> Any:
    for item in data.data:  # the first batch (no batch size needed)
        X, y = data._unpack(item, 0)
        leaves, spec = tree_flatten((X, y))
        return spec, [(tuple(t.shape[1:]), t.dtype) if isinstance(t, torch.Tensor) else type(t) for t in leaves]
    return None


def _check_like(train: Data, queries: Data) -> None:
    want, got = _signature(train, "train"), _signature(queries, "queries")
    if want is not None and got is not None and (want[0] != got[0] or want[1] != got[1]):
        raise fail(
            _API,
            f"the batches of `queries` must have the structure, trailing shapes and dtypes of `train`'s "
            f"(X, y), got {got[0]} with {got[1]}, expected {want[0]} with {want[1]}.",
        )


def _gather(local: torch.Tensor, group: Any) -> torch.Tensor:
    """Concatenate every rank's columns, rank 0's first (two all-reduces; exact: sums with zeros)."""
    if group is None:
        return local
    dist = torch.distributed
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    counts = torch.zeros(world, dtype=torch.int64)
    counts[rank] = local.shape[1]
    counts = all_reduce_sum(counts, group)
    offset, total = int(counts[:rank].sum()), int(counts.sum())
    full = local.new_zeros(local.shape[0], total)
    full[:, offset : offset + local.shape[1]] = local
    return all_reduce_sum(full, group)
