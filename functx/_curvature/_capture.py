"""Recognising the layers of ``params`` during one functional forward (KFAC's capture).

:class:`Capture` is a ``torch.overrides.TorchFunctionMode`` that is active only during the
operator's own forward call of the model (through :func:`functx.nn.make_functional`, never the
user's module). It recognises ``F.linear``, ``F.conv2d`` and ``F.embedding`` calls whose weight
(or bias) is one of the ``params`` tensors *by identity*, records the layer's input and output,
and runs the layer on detached parameters (KFAC never needs the parameters' gradients, only the
gradients at the layer outputs). Any other operation that takes a ``params`` tensor and returns a
tensor that requires grad is recorded as an unsupported use (name and operation), so that a
parameter reaching the loss through anything else is never silently ignored.

A layer output that the model later modifies in place (``ReLU(inplace=True)``) would change what
the gradient with respect to it means: :attr:`Capture.modified` reports it and the caller runs
the forward again with ``clone_outputs=True`` (the recorded output is then a private copy).
No hooks, no tracing: the same code runs for every batch size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_SIGNATURES: dict[Any, tuple[str, tuple[str, ...], tuple[Any, ...]]] = {
    F.linear: ("linear", ("input", "weight", "bias"), (None,)),
    F.conv2d: ("conv2d", ("input", "weight", "bias", "stride", "padding", "dilation", "groups"), (None, 1, 0, 1, 1)),
    F.embedding: (
        "embedding",
        ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
        (None, None, 2.0, False, False),
    ),
}


@dataclass
class Use:
    """One call of a recognised layer: ``kind``, the names of its weight/bias among ``params``
    (``None`` when not selected), its (detached) input, its output (differentiated against;
    ``None`` once released after the backward) and that output's ``shape``, and the options
    (conv2d: stride, padding, dilation, groups, kernel size; embedding: padding_idx and the
    number of embeddings)."""

    kind: str
    weight: str | None
    bias: str | None
    input: torch.Tensor
    output: torch.Tensor | None
    shape: tuple[int, ...]
    version: int
    options: dict[str, Any] = field(default_factory=dict)


class Capture(TorchFunctionMode):
    """Records the uses of ``params`` tensors during one forward.

    Args:
        names: ``id(tensor) -> name`` for the tensors passed as ``params`` in this forward.
        diagonal: names handled as diagonal blocks (run as plain autograd, not recognised).
        roles: name -> (kind, role) seen so far (shared across batches): a tensor used as the
            weight of two different layer kinds, or once as a weight and once as a bias, is an
            unsupported use.
        clone_outputs: record a private copy of each layer output (see the module docstring).
    """

    def __init__(
        self, names: dict[int, str], diagonal: set[str], roles: dict[str, tuple[str, str]], clone_outputs: bool
    ) -> None:
        super().__init__()
        self.names, self.diagonal, self.roles, self.clone_outputs = names, diagonal, roles, clone_outputs
        self.uses: list[Use] = []
        self.unsupported: dict[str, str] = {}

    def name(self, value: Any) -> str | None:
        return self.names.get(id(value)) if isinstance(value, torch.Tensor) else None

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        signature = _SIGNATURES.get(func)
        if signature is not None:
            recorded = self._layer(signature, args, kwargs)
            if recorded is not None:
                return recorded
        result = func(*args, **kwargs)
        used = [n for n in map(self.name, _tensors(args, kwargs)) if n is not None]
        if used and any(t.requires_grad for t in _tensors((result,), {}) if self.name(t) is None):
            what = _op_name(func)
            for n in used:
                self.unsupported.setdefault(n, what)
        return result

    def _layer(self, signature: tuple[str, tuple[str, ...], tuple[Any, ...]], args: Any, kwargs: Any) -> Any:
        kind, names, defaults = signature
        bound = dict(zip(names[len(names) - len(defaults) :], defaults))
        bound.update(zip(names, args))
        bound.update(kwargs)
        x, weight = bound["input"], bound["weight"]
        bias = bound.get("bias") if kind != "embedding" else None
        w, b = self.name(weight), self.name(bias)
        if w is None and b is None:
            return None
        reason = self._unsupported_reason(kind, bound, x, w, b)
        if reason is not None:
            for n in (w, b):
                if n is not None:
                    self.unsupported.setdefault(n, reason)
            return None
        call = dict(bound)
        call["weight"] = weight.detach()
        if torch.is_grad_enabled() and not x.requires_grad:
            # no graph below this layer: a private leaf weight gives the output a node to
            # differentiate at (its own backward never runs), without copying the output
            call["weight"].requires_grad_()
        if bias is not None:
            call["bias"] = bias.detach()
        x_in = call.pop("input")
        out = _FUNCS[kind](x_in, **call)
        returned = out
        if not out.requires_grad:  # grad disabled inside the model: differentiate at a fresh leaf
            out = out.detach().requires_grad_()
            returned = out.clone()
        elif self.clone_outputs:
            returned = out.clone()
        options: dict[str, Any] = {}
        if kind == "conv2d":
            options = {k: bound[k] for k in ("stride", "padding", "dilation", "groups")}
            options["kernel_size"] = tuple(weight.shape[2:])
        elif kind == "embedding":
            options = {"padding_idx": bound["padding_idx"], "num_embeddings": weight.shape[0]}
        for n, role in ((w, "weight"), (b, "bias")):
            if n is not None:
                self.roles.setdefault(n, (kind, role))
        self.uses.append(Use(kind, w, b, x.detach(), out, tuple(out.shape), out._version, options))
        return returned

    def _unsupported_reason(self, kind: str, bound: dict[str, Any], x: Any, w: str | None, b: str | None) -> str | None:
        if (w is not None and w in self.diagonal) or (b is not None and b in self.diagonal):
            return f"{kind} (handled as a diagonal block)"
        if self.name(x) is not None:
            return f"{kind} (a parameter as the layer's input)"
        for n, role in ((w, "weight"), (b, "bias")):
            if n is not None and self.roles.get(n, (kind, role)) != (kind, role):
                seen = self.roles[n]
                return f"{kind} as its {role}, after {seen[0]} as its {seen[1]} (no common Kronecker block)"
        if not isinstance(x, torch.Tensor):
            return f"{kind} (a non-tensor input)"
        if kind == "linear" and x.ndim < 2:
            return "linear (an input without a batch axis)"
        if kind == "conv2d" and x.ndim != 4:
            return "conv2d (an input without a batch axis)"
        if kind == "embedding":
            if bound["max_norm"] is not None:
                return "embedding with max_norm (it rescales the weight in place)"
            if bound["scale_grad_by_freq"]:
                return "embedding with scale_grad_by_freq=True"
            if x.ndim < 1:
                return "embedding (an input without a batch axis)"
        return None

    def modified(self) -> bool:
        """Whether a recorded layer output was modified in place after the layer."""
        return any(u.output is not None and u.output._version != u.version for u in self.uses)


_FUNCS: dict[str, Any] = {"linear": F.linear, "conv2d": F.conv2d, "embedding": F.embedding}


def _tensors(args: Any, kwargs: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    stack = list(args) + list(kwargs.values())
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return found


def _op_name(func: Any) -> str:
    if getattr(func, "__name__", "") == "__get__":
        owner = getattr(func, "__self__", None)
        return f"Tensor.{getattr(owner, '__name__', 'attribute')}"
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    module = getattr(func, "__module__", None) or ""
    if module.startswith("torch") and not name.startswith(("Tensor", "_TensorBase")):
        return f"{module.replace('torch._C._nn', 'torch.nn.functional')}.{name}"
    return name.replace("_TensorBase", "Tensor").replace("TensorBase", "Tensor")


def conv_patches(x: torch.Tensor, options: dict[str, Any]) -> torch.Tensor:
    """``(B, C_in/groups * kh * kw, S)`` patches of a conv2d input, one column per output
    location (``F.unfold``'s layout; channel groups averaged, as curvlinops 3.0.1 does).

    Built as one copy of a strided view of the padded input (several times faster than
    ``F.unfold`` on CPU)."""
    groups = options["groups"]
    kh, kw = options["kernel_size"]
    (sh, sw), (dh, dw) = _pair(options["stride"]), _pair(options["dilation"])
    if groups > 1:
        B, C, H, W = x.shape
        x = x.reshape(B, groups, C // groups, H, W).mean(1)
    top, bottom, left, right = _paddings(options["padding"], (kh, kw), (dh, dw))
    if top or bottom or left or right:
        x = F.pad(x, (left, right, top, bottom))
    B, C, H, W = x.shape
    OH, OW = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
    b, c, h, w = x.stride()
    view = x.as_strided((B, C, kh, kw, OH, OW), (b, c, dh * h, dw * w, sh * h, sw * w), x.storage_offset())
    return view.reshape(B, C * kh * kw, OH * OW)


def _paddings(padding: Any, kernel: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of a conv2d ``padding`` (``"same"``: total ``d (k - 1)``
    per axis, the smaller half first, torch's rule; it requires stride 1)."""
    if padding == "valid":
        return 0, 0, 0, 0
    if padding == "same":
        th, tw = (d * (k - 1) for d, k in zip(dilation, kernel))
        return th // 2, th - th // 2, tw // 2, tw - tw // 2
    ph, pw = _pair(padding)
    return ph, ph, pw, pw


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]
