"""Loss specifications: the reduction (scaling), the loss's Hessian with respect to the
prediction (closed forms for ``CrossEntropyLoss``, ``MSELoss`` and ``BCEWithLogitsLoss``,
autodiff otherwise) and the per-row gradients of the empirical Fisher.

Conventions (those of curvlinops 3.0.1). A batch ``b`` of ``B_b`` samples enters the dataset
loss with the weight ``w_b = B_b / N`` ("mean") or ``1`` ("sum"), applied to the loss module's
own batch value ``l_b``: ``L = sum_b w_b l_b``. For the three modules without ignored targets
this is the loss of the whole dataset taken as one batch. The empirical Fisher sums outer
products of per-row gradients ("rows": samples, or every position of a sequence output; for
a callable loss, samples), scaled so that it equals ``c * sum_n g_n g_n^T`` with ``g_n`` the
gradient of row ``n``'s sum-reduced loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._validate import describe, fail

_REDUCTIONS = ("mean", "sum")


class LossSpec:
    """What the operators need to know about ``loss``.

    Args:
        loss: a ``torch.nn`` loss module or a callable ``loss(prediction, y) -> scalar``.
        reduction: ``"mean"`` or ``"sum"``; required for a callable, optional (and checked)
            for a loss module.
        api: the public name used in error messages.
    """

    def __init__(self, loss: Any, reduction: str | None, api: str) -> None:
        if isinstance(loss, type):
            hint = f" (e.g. {loss.__name__}())" if issubclass(loss, nn.Module) else ""
            raise fail(
                api, f"`loss` must be a loss instance or a callable, got the class {loss.__name__}{hint}.", TypeError
            )
        if not callable(loss):
            raise fail(
                api,
                f"`loss` must be a torch.nn loss module or a callable loss(prediction, y) -> scalar, got {describe(loss)}.",
                TypeError,
            )
        own = getattr(loss, "reduction", None) if isinstance(loss, nn.modules.loss._Loss) else None
        if own is None and reduction is None:
            raise fail(
                api,
                "`reduction` must be given for a callable `loss` without a `reduction` attribute, got None; pass "
                "`reduction='mean'` (the callable averages over the samples of a batch) or `reduction='sum'`.",
                TypeError,
            )
        if own is not None and reduction is not None and reduction != own:
            raise fail(
                api,
                f"`reduction` must agree with the loss module's reduction {own!r}, got {reduction!r}; leave "
                f"`reduction` out for a loss module.",
            )
        chosen = own if own is not None else reduction
        if chosen not in _REDUCTIONS:
            raise fail(
                api,
                f"the loss's reduction must be 'mean' or 'sum' (it sets the scaling over the dataset), got {chosen!r}.",
            )
        self.fn: Callable[[Any, Any], torch.Tensor] = loss
        self.reduction: str = chosen
        self.kind = _kind(loss)
        self.api = api

    def value(self, out: Any, y: Any, k: int) -> torch.Tensor:
        """The loss of batch ``k``, checked: a real floating-point 0-d tensor, attached to the
        prediction's graph when the prediction has one."""
        value = self.fn(out, y)
        if not isinstance(value, torch.Tensor):
            hint = " (a Python number is not differentiable: build it from torch operations)"
            raise fail(
                self.api,
                f"`loss` must return a 0-d tensor, got {describe(value)} for batch {k}"
                f"{hint if isinstance(value, (int, float)) else ''}.",
                TypeError,
            )
        if not value.is_floating_point():
            raise fail(self.api, f"`loss` must return a real floating-point tensor, got {describe(value)}.", TypeError)
        if value.ndim != 0:
            raise fail(
                self.api,
                f"`loss` must return a 0-d tensor (a scalar), got {describe(value)} for batch {k}; reduce it "
                f"(.mean() or .sum()) and pass the matching `reduction`.",
            )
        if isinstance(out, torch.Tensor) and out.requires_grad and not value.requires_grad:
            raise fail(
                self.api,
                f"`loss` must return a tensor that depends on the prediction through torch operations, got a "
                f"detached one for batch {k} (.item(), .detach() or torch.tensor(...) inside the loss?).",
            )
        return value

    def weight(self, batch_size: int, num_data: int) -> float:
        """``w_b``: the weight of a batch's loss in the dataset loss."""
        return batch_size / num_data if self.reduction == "mean" else 1.0

    def ef_scale(self, out: torch.Tensor, batch_size: int, num_data: int) -> float:
        """``w_b * R_b``: the empirical Fisher's factor on ``sum_rows u_n u_n^T`` of a batch, with
        ``u_n`` the gradient of the batch loss with respect to row ``n`` of the prediction and
        ``R_b`` the number of terms the batch loss averages over ("mean")."""
        if self.reduction == "sum":
            return 1.0
        if self.kind == "ce":
            terms = out.numel() // out.shape[1] if out.ndim >= 2 else 1
        elif self.kind in ("mse", "bce"):
            terms = out.numel()
        else:
            terms = batch_size
        return self.weight(batch_size, num_data) * terms

    def row_dims(self, out: torch.Tensor) -> tuple[int, ...]:
        """The axes of the prediction that belong to one row (summed in the EF's inner products)."""
        if self.kind == "ce":
            return (1,) if out.ndim >= 2 else (0,)
        if self.kind in ("mse", "bce"):
            return (out.ndim - 1,) if out.ndim >= 1 else ()
        return tuple(range(1, out.ndim))

    def output_gradient(self, out: torch.Tensor, y: Any) -> torch.Tensor:
        """``d l_b / d out`` (detached)."""
        leaf = out.detach().requires_grad_()
        with torch.enable_grad():
            value = self.fn(leaf, y)
            (grad,) = torch.autograd.grad(value, leaf, allow_unused=True)
        return torch.zeros_like(leaf) if grad is None else grad

    def output_hessian_product(self, out: torch.Tensor, y: Any, t: torch.Tensor, batched: bool) -> torch.Tensor:
        """``(d^2 l_b / d out^2) t`` for ``t`` shaped like ``out`` (with a leading axis when
        ``batched``); closed forms for the three loss modules, autodiff otherwise."""
        closed = _CLOSED_FORMS.get(self.kind)
        if closed is not None and _closed_form_applies(self.kind, self.fn, out, y):
            return closed(self.fn, out.detach(), y, t, self.reduction == "mean", batched)
        return _autodiff_hessian_product(self.fn, out, y, t, batched)


def _kind(loss: Any) -> str:
    for cls, kind in ((nn.CrossEntropyLoss, "ce"), (nn.MSELoss, "mse"), (nn.BCEWithLogitsLoss, "bce")):
        if type(loss) is cls:
            return kind
    return "generic"


def _closed_form_applies(kind: str, loss: Any, out: torch.Tensor, y: Any) -> bool:
    if not isinstance(y, torch.Tensor):
        return False
    if kind == "ce":
        plain = loss.weight is None and loss.label_smoothing == 0.0 and out.ndim >= 2
        return plain and not y.is_floating_point() and y.shape == out.shape[:1] + out.shape[2:]
    if kind == "bce":
        return loss.weight is None and loss.pos_weight is None and y.shape == out.shape
    return y.shape == out.shape  # mse: no broadcasting between prediction and target


def _ce(loss: Any, z: torch.Tensor, y: torch.Tensor, t: torch.Tensor, mean: bool, batched: bool) -> torch.Tensor:
    # Hessian of the sum-reduced cross-entropy per row: diag(p) - p p^T, weighted per row.
    p = torch.softmax(z, dim=1)
    keep = (y != loss.ignore_index).to(z.dtype).unsqueeze(1)
    if mean:
        keep = keep / keep.sum()
    dim = 2 if batched else 1
    pt = p * t
    return keep * (pt - p * pt.sum(dim=dim, keepdim=True))


def _mse(loss: Any, z: torch.Tensor, y: torch.Tensor, t: torch.Tensor, mean: bool, batched: bool) -> torch.Tensor:
    return t * (2.0 / z.numel() if mean else 2.0)


def _bce(loss: Any, z: torch.Tensor, y: torch.Tensor, t: torch.Tensor, mean: bool, batched: bool) -> torch.Tensor:
    s = torch.sigmoid(z)
    return (s * (1 - s) * (1.0 / z.numel() if mean else 1.0)) * t


_CLOSED_FORMS = {"ce": _ce, "mse": _mse, "bce": _bce}


def _autodiff_hessian_product(loss: Any, out: torch.Tensor, y: Any, t: torch.Tensor, batched: bool) -> torch.Tensor:
    leaf = out.detach().requires_grad_()
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(loss(leaf, y), leaf, create_graph=True, allow_unused=True)
        if grad is None or not grad.requires_grad:  # the loss is at most linear in the prediction
            return torch.zeros_like(t)
        (product,) = torch.autograd.grad(grad, leaf, t, is_grads_batched=batched, allow_unused=True)
    return torch.zeros_like(t) if product is None else product


# -- KFAC (issue 17): square roots of the output Hessian and labels from the predictive --------


def output_hessian_sqrt(spec: LossSpec, out: torch.Tensor, y: Any, api: str) -> torch.Tensor:
    """``(C, *out.shape)``: column ``c`` of a square root ``S_r`` of every row's output Hessian
    ``d^2 l_b / d out_r^2 = S_r S_r^T``, placed at that row, so that ``sum_c s_c s_c^T`` is the
    (row-block-diagonal) Hessian of the batch loss ``l_b`` (its own reduction included).

    Rows as in :meth:`LossSpec.row_dims`: the class axis 1 for ``CrossEntropyLoss``, the last axis
    for ``MSELoss``/``BCEWithLogitsLoss``, every axis but the first for another loss (whose
    Hessian is taken blockwise per sample by autodiff and square-rooted by an eigendecomposition;
    a negative eigenvalue, a non-convex loss, raises ``ValueError``).
    """
    out = out.detach()
    if spec.kind in _CLOSED_FORMS and _closed_form_applies(spec.kind, spec.fn, out, y):
        mean = spec.reduction == "mean"
        if spec.kind == "ce":
            p = torch.softmax(out, dim=1)
            keep = (y != spec.fn.ignore_index).to(out.dtype).unsqueeze(1)  # type: ignore[attr-defined]
            if mean:
                keep = keep / keep.sum().clamp_min(1.0)
            eye = torch.eye(out.shape[1], dtype=out.dtype, device=out.device)
            shape = (out.shape[1], 1, out.shape[1]) + (1,) * (out.ndim - 2)
            onehot = eye.reshape(shape)  # (C, 1, C, 1...): e_c along axis 1
            sqrt_p = p.sqrt().movedim(1, 0).unsqueeze(2)  # (C, B, 1, ...): sqrt(p_c) of every row
            return keep.sqrt().unsqueeze(0) * sqrt_p * (onehot - p.unsqueeze(0))  # sqrt(p_c) (e_c - p)
        C = out.shape[-1] if out.ndim else 1
        eye = torch.eye(C, dtype=out.dtype, device=out.device).reshape((C,) + (1,) * max(out.ndim - 1, 0) + (C,))
        if spec.kind == "mse":
            return eye.expand((C,) + out.shape) * ((2.0 / out.numel()) ** 0.5 if mean else 2.0**0.5)
        s = torch.sigmoid(out)
        return eye * (s * (1 - s) * (1.0 / out.numel() if mean else 1.0)).sqrt().unsqueeze(0)
    return _autodiff_hessian_sqrt(spec, out, y, api)


def _autodiff_hessian_sqrt(spec: LossSpec, out: torch.Tensor, y: Any, api: str) -> torch.Tensor:
    B = out.shape[0] if out.ndim else 1
    flat = out.reshape(B, -1)
    C = flat.shape[1]
    eye = torch.eye(C, dtype=out.dtype, device=out.device)
    probes = eye.unsqueeze(1).expand(C, B, C).reshape((C,) + out.shape)  # e_c in every sample
    columns = _autodiff_hessian_product(spec.fn, out, y, probes, True).reshape(C, B, C)
    H = columns.permute(1, 2, 0)  # (B, C, C): sample n's block (off-sample blocks are taken as zero)
    H = (H + H.transpose(1, 2)) / 2
    evals, evecs = torch.linalg.eigh(H)
    scale = evals.abs().amax().clamp_min(torch.finfo(out.dtype).tiny)
    if bool((evals < -1e-6 * scale).any()):
        raise ValueError(
            f"`{api}`: fisher='type-2' needs a loss convex in the prediction (a positive semi-definite "
            f"output Hessian); the loss's Hessian has a negative eigenvalue {float(evals.min()):.3g}. "
            f"Use fisher='empirical', or a convex loss."
        )
    S = evecs * evals.clamp_min(0).sqrt().unsqueeze(1)  # (B, C, C): S S^T = H
    return S.permute(2, 0, 1).reshape((C,) + out.shape)


def draw_labels(spec: LossSpec, out: torch.Tensor, generator: torch.Generator, api: str) -> torch.Tensor:
    """A label drawn from the model's predictive distribution implied by the loss (curvlinops'
    ``draw_label``, same draws for the same generator state): Gaussian with variance 1/2 for
    ``MSELoss``, categorical for ``CrossEntropyLoss``, Bernoulli for ``BCEWithLogitsLoss``. The
    prediction is taken as rows (class axis last) as curvlinops does."""
    out = out.detach()
    if spec.kind == "mse":
        rows = out.reshape(-1, out.shape[-1]) if out.ndim >= 2 else out.reshape(1, -1)
        noise = torch.randn(rows.shape, generator=generator, dtype=out.dtype, device=out.device)
        return (rows + 0.5**0.5 * noise).reshape(out.shape)
    if spec.kind == "ce" and out.ndim >= 2:
        rows = out.movedim(1, -1).reshape(-1, out.shape[1])
        labels = rows.softmax(dim=1).multinomial(num_samples=1, generator=generator).squeeze(-1)
        return labels.reshape(out.shape[:1] + out.shape[2:])
    if spec.kind == "bce":
        return torch.sigmoid(out).bernoulli(generator=generator)
    raise ValueError(
        f"`{api}`: fisher='mc' draws labels from the predictive distribution of nn.MSELoss, nn.CrossEntropyLoss "
        f"or nn.BCEWithLogitsLoss (class axis 1, at least 2-D predictions for cross-entropy); this loss has none. "
        f"Use fisher='type-2' or 'empirical'."
    )
