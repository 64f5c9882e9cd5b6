r"""Every private torch name functx uses, imported once here, each with a documented
fallback or a clear refusal.

Nothing else in functx may import a private torch name (``torch._C``, ``torch._functorch``,
``torch._dynamo``, ``torch.utils._pytree``, ``torch.autograd.forward_ad._*``): import the
entry from this module instead. Each entry is probed once (at import, or at first use for
the costly probes) and reports "unavailable" when the name is missing or misbehaves; the
environment variable ``FUNCTX_TORCH_INTERNALS=off`` (or :func:`switched_off`, for tests)
makes every entry report "unavailable", so the fallbacks can be tested on any torch.

========================================  ==========================  =====================================
private name                              entry here                  when unavailable
========================================  ==========================  =====================================
``torch._C._functorch``                   :func:`transforms_active`   assume a transform may be active: the
``.peek_interpreter_stack``                                           ``torch.func`` paths run instead of the
                                                                      plain-autograd shortcut and solvers
                                                                      never stop early (same numbers, slower)
``torch._functorch.eager_transforms``     :func:`grad_and_value`      the public ``torch.func.grad_and_value``
``.grad_and_value_impl``                                              (same numbers, a few us slower)
``torch._C._functorch._wrap_for_grad``    :func:`lift`                non-differentiated arguments are passed
(+ ``peek_interpreter_stack().level()``)                              as they are: an in-place write that mixes
                                                                      them with differentiated values raises
                                                                      torch's "mutate a captured Tensor" error
``torch._C._functorch``                   :func:`wrapper_chain`,      a tensor is treated as unwrapped
``.is_functorch_wrapped_tensor``,         :func:`unwrap_all`,         (:data:`CAN_UNWRAP` is False; callers
``.get_unwrapped``,                       :data:`functorch`           that need to unwrap must refuse or skip)
``.is_gradtrackingtensor``, ...
``torch._functorch.pyfunctorch``          :data:`retrieve_all_\       None: callers refuse (clear error)
``.retrieve_all_functorch_interpreters``, functorch_interpreters`,
``torch._C._functorch.TransformType``     :data:`TransformType`
``torch.autograd.forward_ad``             :data:`set_fwd_grad_\       None: callers refuse (clear error)
``._set_fwd_grad_enabled``,               enabled`,
``._current_level``                       :func:`forward_ad_level`    ``-1`` (no plain dual level)
``Tensor._version``                       :func:`version`             ``None``: in-place writes to
                                                                      differentiated inputs in forward mode
                                                                      land on functx's private copy and are
                                                                      not reported
``torch.compiler.is_exporting`` (public,  :func:`is_exporting`        ``False``
recent torch only)
========================================  ==========================  =====================================

``torch.utils._pytree`` is not used anywhere in functx: pytrees are optree's.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

ENABLED = os.environ.get("FUNCTX_TORCH_INTERNALS", "on").lower() not in ("off", "0", "false", "no")

# --------------------------------------------------------------------------------------
# Imports, each guarded. Probes follow; `_reset` (re)binds the public entries.

try:
    import torch._C._functorch as _functorch_module
except ImportError:  # pragma: no cover - depends on the torch version
    _functorch_module = None  # type: ignore[assignment,misc]

try:
    from torch._functorch.eager_transforms import grad_and_value_impl as _grad_and_value_impl
except ImportError:  # pragma: no cover
    _grad_and_value_impl = None  # type: ignore[assignment,misc]

try:
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters as _retrieve
except ImportError:  # pragma: no cover
    _retrieve = None  # type: ignore[assignment,misc]

try:
    from torch.autograd.forward_ad import _set_fwd_grad_enabled as _set_fwd
except ImportError:  # pragma: no cover
    _set_fwd = None  # type: ignore[assignment,misc]


def _attr(obj: Any, name: str) -> Any:
    return getattr(obj, name, None) if obj is not None else None


# Public entries (rebound by `_reset`).
functorch: Any = None
"""``torch._C._functorch`` (or ``None``): for the implicit room's forward-mode rules only."""
TransformType: Any = None
retrieve_all_functorch_interpreters: Callable[[], Any] | None = None
set_fwd_grad_enabled: Callable[[bool], Any] | None = None
CAN_UNWRAP = False
"""Whether :func:`wrapper_chain`/:func:`unwrap_all` can see through functorch wrappers."""
CAN_LIFT = False
HAVE_VERSION = False

_peek: Callable[[], Any] | None = None
_impl: Callable[..., Any] | None = None
_is_wrapped: Callable[[torch.Tensor], bool] | None = None
_unwrap: Callable[[torch.Tensor], torch.Tensor] | None = None
_wrap_for_grad: Callable[[torch.Tensor, int], torch.Tensor] | None = None


def _probe_peek(peek: Any) -> Any:
    """``peek_interpreter_stack`` must say "none" here and "some" inside ``torch.func.grad``."""
    if not callable(peek) or peek() is not None:
        return None
    seen: list[Any] = []

    def record(x: torch.Tensor) -> torch.Tensor:
        seen.append(peek())
        return x

    torch.func.grad(record)(torch.tensor(1.0))
    return peek if seen and seen[0] is not None and callable(getattr(seen[0], "level", None)) else None


def _probe_version() -> bool:
    t = torch.zeros(1)
    v = getattr(t, "_version", None)
    t.add_(1)
    return isinstance(v, int) and getattr(t, "_version", None) == v + 1


def _reset(enabled: bool) -> None:
    """Bind every entry to the private name (probed) or to its fallback."""
    global functorch, TransformType, retrieve_all_functorch_interpreters, set_fwd_grad_enabled
    global CAN_UNWRAP, CAN_LIFT, HAVE_VERSION, _peek, _impl, _is_wrapped, _unwrap, _wrap_for_grad
    ft = _functorch_module if enabled else None
    functorch = ft
    TransformType = _attr(ft, "TransformType")
    retrieve_all_functorch_interpreters = _retrieve if enabled else None
    set_fwd_grad_enabled = _set_fwd if enabled else None
    _peek = _probe_peek(_attr(ft, "peek_interpreter_stack")) if enabled else None
    _impl = _grad_and_value_impl if enabled else None
    _is_wrapped, _unwrap = _attr(ft, "is_functorch_wrapped_tensor"), _attr(ft, "get_unwrapped")
    CAN_UNWRAP = _is_wrapped is not None and _unwrap is not None
    _wrap_for_grad = _attr(ft, "_wrap_for_grad")
    CAN_LIFT = _wrap_for_grad is not None and _peek is not None
    HAVE_VERSION = enabled and _probe_version()


_reset(ENABLED)


@contextlib.contextmanager
def switched_off() -> Iterator[None]:
    """Make every entry report "unavailable" inside the block (for tests of the fallbacks)."""
    _reset(False)
    try:
        yield
    finally:
        _reset(ENABLED)


# --------------------------------------------------------------------------------------
# Entries.


def transforms_active() -> bool:
    """Whether a ``torch.func``/functx transform may be active (the functorch interpreter
    stack is not empty). Unavailable: ``True`` (the safe answer). On the grad hot path:
    one C call."""
    return _peek is None or _peek() is not None


def grad_and_value(fn: Callable[..., Any], argnums: Any, has_aux: bool, args: tuple[Any, ...]) -> Any:
    """``torch.func.grad_and_value(fn, argnums, has_aux)(*args)``; in eager mode without the
    wrapper the public API builds on every call (same implementation underneath)."""
    if _impl is not None and not torch.compiler.is_compiling():
        return _impl(fn, argnums, has_aux, args, {})
    return torch.func.grad_and_value(fn, argnums=argnums, has_aux=has_aux)(*args)


def lift(tensors: Sequence[Any]) -> list[Any]:
    """Wrap plain tensors at the level of the innermost running transform, as ``torch.func``
    does with every positional argument, so ``func`` may write them in place with values of
    that level. Non-tensors and unavailable internals: returned as they are."""
    if not CAN_LIFT or _peek is None or _wrap_for_grad is None or torch.compiler.is_compiling():
        return list(tensors)
    interpreter = _peek()
    if interpreter is None:
        return list(tensors)
    level = interpreter.level()
    wrap = _wrap_for_grad
    return [wrap(t, level) if isinstance(t, torch.Tensor) else t for t in tensors]


def wrapper_chain(t: torch.Tensor) -> list[torch.Tensor]:
    """``[t, unwrapped(t), unwrapped(unwrapped(t)), ...]`` down to the plain tensor;
    ``[t]`` when the internals are unavailable."""
    chain = [t]
    if _is_wrapped is None or _unwrap is None:
        return chain
    while _is_wrapped(chain[-1]):
        chain.append(_unwrap(chain[-1]))
    return chain


def unwrap_all(t: torch.Tensor) -> torch.Tensor:
    """The tensor under every functorch wrapper (all vmap lanes); ``t`` when unavailable."""
    return wrapper_chain(t)[-1]


def forward_ad_level() -> int:
    """``torch.autograd.forward_ad._current_level`` (``-1``: no plain dual level)."""
    import torch.autograd.forward_ad as fwAD

    level = getattr(fwAD, "_current_level", -1) if functorch is not None else -1
    return level if isinstance(level, int) else -1


def version(t: torch.Tensor) -> tuple[int, ...] | None:
    """The version counters of ``t`` and of every functorch wrapper level under it (bumped by
    every in-place write to ``t`` or a view of it), or ``None`` when unavailable."""
    if not HAVE_VERSION:
        return None
    if _is_wrapped is None or not _is_wrapped(t):  # the common case: a plain tensor, no chain to build
        return (t._version,)
    return tuple(u._version for u in wrapper_chain(t))


def is_exporting() -> bool:
    """``torch.compiler.is_exporting()`` where torch has it, else ``False``."""
    probe = getattr(torch.compiler, "is_exporting", None)
    return bool(probe and probe())


def require(available: Any, what: str, api: str) -> None:
    """The refusal: ``NotImplementedError`` naming ``api`` when an entry is unavailable."""
    if available is None or available is False:
        raise NotImplementedError(
            f"`functx.{api}`: {what} needs torch internals that are unavailable in torch "
            f"{torch.__version__} (or switched off with FUNCTX_TORCH_INTERNALS=off)."
        )


# --------------------------------------------------------------------------------------
# Solvers and implicit differentiation (functx._solvers._functorch, functx._implicit).
#
# ========================================  ==========================  =====================================
# private name                              entry here                  when unavailable
# ========================================  ==========================  =====================================
# ``torch._C._functorch`` + interpreters    :func:`rule_internals_\     False: the forward-mode rules of
# + ``_set_fwd_grad_enabled``               available`                 linear solves / implicit functions
#                                                                       refuse (``NotImplementedError``)
# ``peek_interpreter_stack`` (as above)     :func:`transforms_\         ``False`` (unlike
#                                           detected`                   :func:`transforms_active`): "no
#                                                                       transform seen", for callers that
#                                                                       only peel or strip what they see
# ``retrieve_all_functorch_interpreters``,  :func:`transform_levels`    ``[]``
# ``TransformType.Jvp``
# ``maybe_get_level``, ``is_batchedtensor``, :func:`strip_tangent`      not called (the rules refuse first)
# ``_unwrap_batched``, ``_add_batch_dim``,
# ``_wrap_for_grad``, ``_unwrap_for_grad``
# ``is_dead_tensor_wrapper``,               :func:`unwrap_dead`         the tensor as it is
# ``unwrap_if_dead``
# ``is_gradtrackingtensor``                 :func:`is_grad_wrapper`     ``False``
# ========================================  ==========================  =====================================


def rule_internals_available() -> bool:
    """Whether every private name the forward-mode rules of linear solves and implicit
    functions need is available (functorch, its interpreter stack, the forward-AD switch)."""
    return (
        functorch is not None and retrieve_all_functorch_interpreters is not None and set_fwd_grad_enabled is not None
    )


def transforms_detected() -> bool:
    """Whether a functorch transform is *seen* live. Unsure (internals unavailable):
    ``False``, the opposite of :func:`transforms_active`'s safe answer: callers use it to
    decide whether there is a wrapper to peel or a level to strip, and without the
    internals there is nothing they could peel."""
    return rule_internals_available() and transforms_active()


def transform_levels(forward_only: bool = False) -> list[int]:
    """The levels of the live functorch transforms (only the ``jvp``/``jacfwd`` ones when
    ``forward_only``); ``[]`` when none is detected."""
    if not transforms_detected():
        return []
    interpreters = retrieve_all_functorch_interpreters()  # type: ignore[misc]
    jvp = TransformType.Jvp
    return [i.level() for i in interpreters if not forward_only or i.key() == jvp]


def strip_tangent(t: torch.Tensor, level: int) -> torch.Tensor:
    """``t`` without its tangent at functorch level ``level``; every other level is kept
    (a batched level above it is unwrapped and rewrapped). Needs
    :func:`rule_internals_available`."""
    ft = functorch
    lvl = ft.maybe_get_level(t)
    if lvl < level:
        return t
    if ft.is_batchedtensor(t):  # a vmap level above the rule's (torch's generated vmap rule)
        inner, bdim = ft._unwrap_batched(t, lvl)
        return ft._add_batch_dim(strip_tangent(inner, level), bdim, lvl)
    if lvl == level:
        return ft._wrap_for_grad(ft._unwrap_for_grad(t, level), level)
    raise NotImplementedError(  # pragma: no cover - torch never saves such a tensor
        "functx: unexpected functorch wrapper above the running forward-mode level."
    )


def unwrap_dead(t: Any) -> Any:
    """``t`` without the wrappers of functorch transforms that have exited; ``t`` itself
    when it is not a tensor or the internals are unavailable."""
    ft = functorch
    if ft is None:
        return t
    while isinstance(t, torch.Tensor) and ft.is_dead_tensor_wrapper(t):
        t = ft.unwrap_if_dead(t)
    return t


def is_grad_wrapper(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``grad``/``jvp`` wrapper (``False`` when unavailable)."""
    return functorch is not None and bool(functorch.is_gradtrackingtensor(t))
