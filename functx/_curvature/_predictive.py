"""Pushing a parameter covariance through the network: ``J(x) S J(x)^T`` per input row.

The linearised (GLM) predictive of a Laplace approximation ``N(theta, S)`` has, at input
``x``, the output covariance ``J(x) S J(x)^T`` with ``J(x)`` the ``(C, P)`` Jacobian of the
model's output row with respect to the parameters. :func:`output_covariance` computes it
chunk by chunk: per-row Jacobians by ``functx.vmap(functx.jacrev(...))`` for ``chunk_size``
rows at a time, one product of ``S`` with their ``(P, chunk_size * C)`` transpose, and the
row-wise contraction; the ``(B, C, P)`` Jacobian of all the inputs is never held.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .._tree import tree_flatten, tree_unflatten
from .._validate import check_bool, check_chunk_size, describe, fail
from ._base import square_operator
from ._params import Layout, model_function

_API = "curvature.output_covariance"
_CHUNK_ENTRIES = 1 << 23  # default chunk: about 8M Jacobian entries (64 MiB in float64)


def output_covariance(
    model: Any,
    params: Any,
    X: Any,
    S: Any,
    *,
    diagonal: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The output covariance ``J(x) S J(x)^T`` of every input row under a parameter covariance ``S``.

    ``J(x)`` is the ``(C, P)`` Jacobian of the model's prediction for row ``x`` (flattened to
    ``C`` entries) with respect to ``params`` (flattened as the curvature operators do:
    ``params``' key order, each tensor row-major). With ``S`` the posterior covariance of a
    Laplace approximation (``K.inverse(damping)``, ``fc.InverseOperator(G, damping)`` or a
    dense matrix), this is the covariance of the linearised (GLM) predictive
    ``f(x) ~ N(f_MAP(x), J S J^T)``.

    Jacobians are computed for ``chunk_size`` rows at a time (``functx.vmap`` of
    ``functx.jacrev`` of one row), ``S`` is applied once per chunk to the ``(P, chunk * C)``
    matrix of their transposes, and only the ``(chunk, C, P)`` Jacobian of one chunk is ever
    held. The Jacobian is taken at ``params`` and is not differentiated; the result is
    differentiable with respect to the tensors ``S`` depends on (a tensor ``damping``, so
    that a predictive loss can tune it), as far as ``S @`` is.

    Rows are independent: the model must map row ``i`` of ``X`` to row ``i`` of its
    prediction (no batch statistics: call ``model.eval()`` first).

    Args:
        model: an ``nn.Module`` (evaluated through :func:`functx.nn.make_functional`; never
            written) or a callable ``model(params, X) -> prediction``.
        params: a dict name -> tensor (for a module: a subset of ``named_parameters()``) or,
            for a callable model, any pytree of tensors.
        X: the inputs, a tensor (or a pytree of tensors) whose leading axis indexes the
            ``B`` rows.
        S: a symmetric ``(P, P)`` operator with ``shape`` and ``@`` on ``(P, K)`` matrices
            (any curvature operator, ``K.inverse(...)``, ``fc.InverseOperator``), or a dense
            ``(P, P)`` tensor.
        diagonal: return only the variances ``diag(J S J^T)``. (default: ``False``)
        chunk_size: the number of rows whose Jacobian is held at once. (default: ``None``,
            as many rows as keep a chunk's Jacobian near 8M entries, at least one)

    Returns:
        A ``(B, C, C)`` tensor (``(B, C)`` with ``diagonal=True``), ``C`` the number of
        entries of one row's prediction.

    Raises:
        TypeError: ``S`` is neither a tensor nor an operator; a bad ``diagonal`` or
            ``chunk_size``; a prediction that is not a tensor.
        ValueError: ``S`` is not ``(P, P)``; ``X`` has no rows axis or its leaves disagree on
            the number of rows.

    Example:
        >>> import torch, functx.curvature as fc
        >>> model = torch.nn.Linear(3, 2)
        >>> params = dict(model.named_parameters())
        >>> X = torch.randn(5, 3)
        >>> cov = fc.output_covariance(model, params, X, torch.eye(8))  # S = I
        >>> cov.shape
        torch.Size([5, 2, 2])
        >>> # for a Linear layer, J J^T = (|x|^2 + 1) I
        >>> torch.allclose(cov[:, 0, 0], X.pow(2).sum(1) + 1, atol=1e-5)
        True
        >>> fc.output_covariance(model, params, X, torch.eye(8), diagonal=True).shape
        torch.Size([5, 2])
    """
    api = f"functx.{_API}"
    layout = Layout(params, api, model=model)
    forward, _ = model_function(model, layout, api)
    check_bool(diagonal, "diagonal", _API)
    chunk_size = check_chunk_size(chunk_size, _API)
    apply_S = square_operator(S, "S", layout.size, _API)
    leaves, spec, rows = _rows(X)
    C = _output_size(forward, layout, spec, leaves)
    if rows == 0:
        return torch.zeros((0, C) if diagonal else (0, C, C), dtype=layout.dtype, device=layout.device)
    chunk = chunk_size or max(1, _CHUNK_ENTRIES // max(1, C * layout.size))
    jacobian = _row_jacobian(forward, layout)
    results = []
    for start in range(0, rows, chunk):
        piece = tree_unflatten(spec, [leaf[start : start + chunk] for leaf in leaves])
        results.append(_contract(jacobian(piece), apply_S, diagonal))  # one (chunk, C, P) Jacobian at a time
    return torch.cat(results)


def _contract(J: torch.Tensor, apply_S: Any, diagonal: bool) -> torch.Tensor:
    b, C, P = J.shape
    M = apply_S(J.reshape(b * C, P).T)  # (P, b C): S J^T
    M = M.T.reshape(b, C, P)
    if diagonal:
        return (J.to(M.dtype) * M).sum(-1)
    cov = J.to(M.dtype) @ M.transpose(1, 2)
    return 0.5 * (cov + cov.transpose(1, 2))  # symmetric up to rounding: make it exactly so


def _rows(X: Any) -> tuple[list[torch.Tensor], Any, int]:
    leaves, spec = tree_flatten(X)
    if not leaves or not all(isinstance(leaf, torch.Tensor) and leaf.ndim >= 1 for leaf in leaves):
        raise fail(_API, f"`X` must be a tensor (or a pytree of tensors) with a leading rows axis, got {describe(X)}.")
    counts = {leaf.shape[0] for leaf in leaves}
    if len(counts) > 1:
        raise fail(_API, f"the leaves of `X` must share the number of rows (leading axis), got {sorted(counts)}.")
    return leaves, spec, counts.pop()


def _row_jacobian(forward: Any, layout: Layout) -> Any:
    """``X_chunk -> (b, C, P)``: the per-row Jacobians of the prediction, flat over params."""
    import functx

    def row(leaves: list[torch.Tensor], x: Any) -> torch.Tensor:
        one = tree_unflatten(tree_flatten(x)[1], [t.unsqueeze(0) for t in tree_flatten(x)[0]])
        out = forward(layout.to_tree(leaves), one)
        if not isinstance(out, torch.Tensor):
            raise fail(_API, f"the model's prediction must be a tensor, got {describe(out)}.", TypeError)
        return out.reshape(-1)

    per_row = functx.vmap(functx.jacrev(row), in_dims=(None, 0))

    def jacobian(X: Any) -> torch.Tensor:
        with torch.enable_grad():
            blocks = per_row(list(layout.leaves), X)  # [(b, C, *shape)] per leaf
        b, C = blocks[0].shape[:2]
        return torch.cat([block.reshape(b, C, -1) for block in blocks], dim=2)

    return jacobian


def _output_size(forward: Any, layout: Layout, spec: Any, leaves: list[torch.Tensor]) -> int:
    """``C``: the number of entries of one row's prediction (one forward pass on the first row,
    or on the empty batch)."""
    with torch.no_grad():
        out = forward(layout.to_tree(list(layout.leaves)), tree_unflatten(spec, [leaf[:1] for leaf in leaves]))
    if not isinstance(out, torch.Tensor):
        raise fail(_API, f"the model's prediction must be a tensor, got {describe(out)}.", TypeError)
    return math.prod(out.shape[1:])
