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
``torch._C._functorch``                   :func:`grad_and_value`,     the public ``torch.func`` transforms
``._grad_increment_nesting``,             :func:`vmap_enter`, ...     (same numbers; torch's Python pytree
``._vmap_increment_nesting``,             (:data:`CAN_FLAT`)          work on every call is the difference)
``._wrap_for_grad``, ``._unwrap_for_grad``,
``._add_batch_dim``, ``._remove_batch_dim``,
``.is_batchedtensor``,
``.set_inplace_requires_grad_allowed``
``torch.compiler.is_exporting`` (public,  :func:`is_exporting`        ``False``
recent torch only)
``torch.autograd.Variable``               :func:`engine_grad`         ``None``: the caller runs the public
``._execution_engine.run_backward``                                   ``torch.autograd.grad`` (same numbers,
                                                                      ~18 us of Python preamble slower)
========================================  ==========================  =====================================

The flat fast paths (:func:`grad_and_value`, :func:`vmap_enter`/:func:`vmap_exit`) do what
``torch.func.grad_and_value``/``torch.vmap`` do underneath, on flat lists of tensors, and
run only in eager mode (:func:`flat_ok`: not compiling, exporting or tracing, no compiled
autograd); everywhere else the public transforms run.

``torch.utils._pytree`` is not used anywhere in functx: pytrees are optree's.
"""

from __future__ import annotations

import contextlib
import os
import sys
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

_run_backward_name = getattr(getattr(torch.autograd.Variable, "_execution_engine", None), "run_backward", None)

try:
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters as _retrieve
except ImportError:  # pragma: no cover
    _retrieve = None  # type: ignore[assignment,misc]

try:
    from torch.autograd.forward_ad import _set_fwd_grad_enabled as _set_fwd
except ImportError:  # pragma: no cover
    _set_fwd = None  # type: ignore[assignment,misc]

try:
    from torch._functorch import eager_transforms as _eager_transforms
except ImportError:  # pragma: no cover
    _eager_transforms = None  # type: ignore[assignment]

try:
    from torch._functorch.predispatch import lazy_load_decompositions as _lazy_load_decompositions
except ImportError:  # pragma: no cover
    _lazy_load_decompositions = None  # type: ignore[assignment]

_SAVED_HOOKS_NAMES = (
    "_saved_tensors_hooks_get_disabled_error_message",
    "_saved_tensors_hooks_disable",
    "_saved_tensors_hooks_enable",
)
_SAVED_HOOKS_MESSAGE = (
    "torch.func.{grad, vjp, jacrev, hessian} don't yet support saved tensor hooks. "
    "Please open an issue with your use case."
)
_FLAT_NAMES = (
    "_grad_increment_nesting",
    "_grad_decrement_nesting",
    "_wrap_for_grad",
    "_unwrap_for_grad",
    "get_inplace_requires_grad_allowed",
    "set_inplace_requires_grad_allowed",
    "_vmap_increment_nesting",
    "_vmap_decrement_nesting",
    "_add_batch_dim",
    "_remove_batch_dim",
    "is_batchedtensor",
)


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
CAN_FLAT = False
"""Whether the flat fast paths of :func:`grad_and_value` and :func:`vmap_enter` are available
(probed at the first call of :func:`flat_ok`)."""
_flat_names_ok: bool | None = None  # None: probed; True: names present, probe pending

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


def _probe_flat() -> bool:
    """The flat paths must give torch.func's numbers on a small problem (else: unavailable)."""
    try:
        with torch.inference_mode(False), torch.enable_grad():
            return _run_flat_probe()
    except Exception:  # pragma: no cover - depends on the torch version
        return False


def _run_flat_probe() -> bool:
    global _decompositions_loaded
    if _lazy_load_decompositions is not None:
        _lazy_load_decompositions()
    _decompositions_loaded = True
    x = torch.tensor([1.0, 2.0])
    g, v = _flat_grad_and_value(lambda t: (t**3).sum(), 0, False, (x,))
    level = _vmap_enter(2, "error")
    try:
        y = _functorch_module._remove_batch_dim(_functorch_module._add_batch_dim(x, 0, level) * 2, level, 2, 0)
    finally:
        _functorch_module._vmap_decrement_nesting()
    out, slope = _flat_jvp(lambda t: t**3, (x,), (torch.ones(2),), False)
    square, pullback = _flat_vjp(lambda t: t**2, (x,), False)
    (cotangent,) = pullback(torch.ones(2))
    return bool(
        torch.equal(square, x**2)
        and torch.equal(cotangent, 2 * x)
        and torch.equal(g, 3 * x**2)
        and float(v) == 9.0
        and torch.equal(y, 2 * x)
        and torch.equal(out, x**3)
        and torch.equal(slope, 3 * x**2)
    )


PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)  # exactly these types: no subclass, no wrapper
_run_backward: Callable[..., Any] | None = None  # bound by _reset


def _probe_run_backward(run: Any) -> Callable[..., Any] | None:
    """``run`` if it computes what ``torch.autograd.grad`` computes on a small graph."""
    if not callable(run):
        return None
    try:
        x = torch.tensor([1.0, 2.0], requires_grad=True)
        y = (x * x).sum()
        (g,) = run((y,), (torch.ones_like(y),), True, True, (x,), True, False)
        (h,) = run((g,), (torch.ones_like(g),), False, False, (x,), True, False)
        ok = torch.equal(g.detach(), torch.tensor([2.0, 4.0])) and torch.equal(h, torch.tensor([2.0, 2.0]))
        return run if ok else None
    except Exception:  # pragma: no cover - a torch whose engine entry changed
        return None


def _reset(enabled: bool) -> None:
    """Bind every entry to the private name (probed) or to its fallback."""
    global functorch, TransformType, retrieve_all_functorch_interpreters, set_fwd_grad_enabled
    global CAN_UNWRAP, CAN_LIFT, HAVE_VERSION, CAN_FLAT, _peek, _impl, _is_wrapped, _unwrap, _wrap_for_grad
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
    global _run_backward
    _run_backward = _probe_run_backward(_run_backward_name) if enabled else None
    global _flat_names_ok
    CAN_FLAT = False  # probed at first use (the probe runs the flat paths, defined below)
    _flat_names_ok = (
        ft is not None
        and _peek is not None
        and _set_fwd is not None
        and all(callable(_attr(ft, n)) for n in _FLAT_NAMES)
        and all(callable(_attr(_eager_transforms, n)) for n in ("enter_jvp_nesting", "exit_jvp_nesting"))
        and isinstance(_attr(_eager_transforms, "JVP_NESTING"), int)
        and all(callable(_attr(torch._C._autograd, n)) for n in _SAVED_HOOKS_NAMES)
    )


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


def flat_ok() -> bool:
    """Whether the flat fast paths may run now: available, and plain eager execution (not
    compiling, exporting or tracing; compiled autograd off)."""
    global CAN_FLAT, _flat_names_ok
    if not _eager():
        return False
    if _flat_names_ok:  # first eager use: probe once
        _flat_names_ok = None
        CAN_FLAT = _probe_flat()
    return CAN_FLAT


def engine_grad(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    grad_outputs: Sequence[torch.Tensor] | None,
    create_graph: bool,
    retain_graph: bool | None,
) -> tuple[torch.Tensor | None, ...] | None:
    """``torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True, ...)`` by a
    direct call of the autograd engine, for plain CPU tensors in eager mode; ``None`` where
    the public function must run instead (then the caller calls it).

    ``torch.autograd.grad``'s Python preamble (argument normalisation, ``__torch_function__``
    dispatch, the implicit ones of scalar outputs with their checks, the compiler context it
    stashes for device threads) costs about 18 us a call: a few percent of a small double
    backward (``hvp``, curvature products). It does nothing for plain CPU tensors (the CPU
    backward runs on the calling thread) whose ``grad_outputs`` match the outputs' shapes and
    dtypes, outside every transform and every ``TorchFunctionMode``, which is all this entry
    accepts; anything else returns ``None``.
    """
    if _run_backward is None or not _eager() or transforms_active():
        return None
    tensors = (*outputs, *inputs)
    for t in tensors:
        if type(t) not in PLAIN_TENSORS or not t.is_cpu:
            return None
    if torch.overrides.has_torch_function(tensors):  # a TorchFunctionMode would see torch.autograd.grad
        return None
    if grad_outputs is None:
        for out in outputs:
            if out.numel() != 1 or not out.is_floating_point():
                return None
        grad_outputs = [torch.ones_like(out, memory_format=torch.preserve_format) for out in outputs]
    else:
        for out, g in zip(outputs, grad_outputs):
            if type(g) not in PLAIN_TENSORS or not g.is_cpu or g.shape != out.shape or g.dtype != out.dtype:
                return None
    keep = create_graph if retain_graph is None else retain_graph
    return _run_backward(tuple(outputs), tuple(grad_outputs), keep, create_graph, tuple(inputs), True, False)  # type: ignore[no-any-return]


def _eager() -> bool:
    """Plain eager execution: not compiling, exporting or tracing; compiled autograd off."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or is_exporting():
        return False
    compiled_autograd = sys.modules.get("torch._dynamo.compiled_autograd")
    return not getattr(compiled_autograd, "compiled_autograd_enabled", False)


def grad_and_value(fn: Callable[..., Any], argnums: Any, has_aux: bool, args: tuple[Any, ...]) -> Any:
    """``torch.func.grad_and_value(fn, argnums, has_aux)(*args)`` for a tuple ``args`` of
    tensors, all differentiated by ``fn``'s caller (``argnums`` selects which gradients are
    returned: an int or a tuple of ints). In eager mode this is torch.func's implementation
    without its pytree work (``fn`` takes and returns flat tensors; with ``has_aux`` it
    returns ``(scalar, tuple_of_tensors)``)."""
    if flat_ok():
        return _flat_grad_and_value(fn, argnums, has_aux, args)
    if _impl is not None and not torch.compiler.is_compiling():
        return _impl(fn, argnums, has_aux, args, {})
    return torch.func.grad_and_value(fn, argnums=argnums, has_aux=has_aux)(*args)


def _hooks_off() -> Any:
    """Refuse saved-tensor hooks while a grad level runs, as torch.func does
    (``torch.autograd.graph.disable_saved_tensors_hooks``); returns what to restore."""
    previous = torch._C._autograd._saved_tensors_hooks_get_disabled_error_message()
    torch._C._autograd._saved_tensors_hooks_disable(_SAVED_HOOKS_MESSAGE)
    return previous


def _hooks_restore(previous: Any) -> None:
    if previous is None:
        torch._C._autograd._saved_tensors_hooks_enable()
    else:
        torch._C._autograd._saved_tensors_hooks_disable(previous)


def _wrap_differentiable(args: Sequence[torch.Tensor], level: int) -> list[torch.Tensor]:
    """``args`` wrapped at grad ``level`` and requiring grad (torch.func's ``_create_differentiable``)."""
    ft = _functorch_module
    wrapped = [ft._wrap_for_grad(t, level) for t in args]
    allowed = ft.get_inplace_requires_grad_allowed()
    ft.set_inplace_requires_grad_allowed(True)
    try:
        for t in wrapped:
            t.requires_grad_()
    finally:
        ft.set_inplace_requires_grad_allowed(allowed)
    return wrapped


def _unwrap_aux(aux: Any, level: int) -> Any:
    unwrap = _functorch_module._unwrap_for_grad
    return unwrap(aux, level) if isinstance(aux, torch.Tensor) else tuple(unwrap(a, level) for a in aux)


def vjp(fn: Callable[..., Any], primals: Sequence[torch.Tensor], has_aux: bool) -> Any:
    """``torch.func.vjp(fn, *primals, has_aux=has_aux)`` for flat tensors and a ``fn``
    returning a tensor or a tuple of tensors (with ``has_aux``: paired with a tensor or a
    tuple of tensors); the pullback takes cotangents packed like the output and returns a
    tuple. Where :func:`flat_ok`, torch.func's implementation without its pytree work."""
    if flat_ok():
        return _flat_vjp(fn, primals, has_aux)
    return torch.func.vjp(fn, *primals, has_aux=has_aux)


def _flat_vjp(fn: Callable[..., Any], primals: Sequence[torch.Tensor], has_aux: bool) -> Any:
    """``torch._functorch.eager_transforms._vjp_with_argnums`` on flat tensors."""
    ft = _functorch_module
    hooks = _hooks_off()
    level = ft._grad_increment_nesting()
    try:
        with torch.enable_grad():
            wrapped = _wrap_differentiable(primals, level)
            result = fn(*wrapped)
            aux: Any = None
            if has_aux:
                result, aux = result
                aux = _unwrap_aux(aux, level)
            single = isinstance(result, torch.Tensor)
            outs = (result,) if single else tuple(result)
            unwrap = ft._unwrap_for_grad
            primals_out = [unwrap(o, level) for o in outs]
    finally:
        ft._grad_decrement_nesting()
        _hooks_restore(hooks)

    def pullback(cotangents: Any) -> tuple[torch.Tensor, ...]:
        cts = (cotangents,) if single else tuple(cotangents)
        create_graph = torch.is_grad_enabled()
        if torch.is_inference_mode_enabled():  # as torch.func: without clobbering grad modes
            with torch.inference_mode(False), torch.set_grad_enabled(create_graph):
                return _autograd_grad(outs, wrapped, cts, create_graph)
        return _autograd_grad(outs, wrapped, cts, create_graph)

    out: Any = primals_out[0] if single else tuple(primals_out)
    return (out, pullback, aux) if has_aux else (out, pullback)


def _autograd_grad(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    cotangents: Sequence[torch.Tensor],
    create_graph: bool,
) -> tuple[torch.Tensor, ...]:
    """torch.func's ``_autograd_grad``: outputs that do not require grad are skipped, unused
    inputs get zeros, the graph is retained."""
    keep = [k for k, o in enumerate(outputs) if o.requires_grad]
    if not keep:
        return tuple(torch.zeros_like(x) for x in inputs)
    grads = torch.autograd.grad(
        [outputs[k] for k in keep],
        inputs,
        [cotangents[k] for k in keep],
        retain_graph=True,
        create_graph=create_graph,
        allow_unused=True,
    )
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs))


def _flat_grad_and_value(fn: Callable[..., Any], argnums: Any, has_aux: bool, args: tuple[Any, ...]) -> Any:
    """``torch._functorch.eager_transforms.grad_and_value_impl`` on a flat tuple of tensors."""
    ft = _functorch_module
    hooks = _hooks_off()
    level = ft._grad_increment_nesting()
    try:
        with torch.enable_grad():  # see torch.func's NOTE [grad and vjp interaction with no_grad]
            wrapped = _wrap_differentiable(args, level)
            output = fn(*wrapped)
            aux: Any = None
            if has_aux:
                output, aux = output
            inputs = [wrapped[argnums]] if isinstance(argnums, int) else [wrapped[i] for i in argnums]
            if output.requires_grad:
                grads = torch.autograd.grad((output,), inputs, create_graph=True, allow_unused=True)
                grads = tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs))
            else:
                grads = tuple(torch.zeros_like(x) for x in inputs)
            unwrap = ft._unwrap_for_grad
            flat_grads = [unwrap(g, level) for g in grads]
            output = unwrap(output, level)
            if has_aux:
                aux = _unwrap_aux(aux, level)
    finally:
        ft._grad_decrement_nesting()
        _hooks_restore(hooks)
    grad_input = flat_grads[0] if isinstance(argnums, int) else tuple(flat_grads)
    return (grad_input, (output, aux)) if has_aux else (grad_input, output)


def jvp(
    fn: Callable[..., Any], primals: tuple[torch.Tensor, ...], tangents: tuple[torch.Tensor, ...], has_aux: bool
) -> Any:
    """``torch.func.jvp(fn, primals, tangents, has_aux=has_aux)`` for flat tuples of tensors
    and a ``fn`` returning a tensor or a tuple of tensors (with ``has_aux``: paired with a
    tensor or a tuple of tensors). Where :func:`flat_ok`, torch.func's implementation
    without its pytree work."""
    if flat_ok():
        return _flat_jvp(fn, primals, tangents, has_aux)
    return torch.func.jvp(fn, primals, tangents, has_aux=has_aux)


def _flat_jvp(
    fn: Callable[..., Any], primals: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor], has_aux: bool
) -> Any:
    """``torch._functorch.eager_transforms._jvp_with_argnums`` on flat tuples."""
    import torch.autograd.forward_ad as fwAD

    et = _eager_transforms
    level = et.enter_jvp_nesting()
    try:
        with _set_fwd(True):
            ctx = fwAD.dual_level() if et.JVP_NESTING == 1 else contextlib.nullcontext()
            with ctx:
                result = fn(*[fwAD.make_dual(p, t) for p, t in zip(primals, tangents)])
                aux: Any = None
                if has_aux:
                    result, aux = result
                single = isinstance(result, torch.Tensor)
                unwrap = _functorch_module._unwrap_for_grad
                outs, slopes = [], []
                for dual in (result,) if single else result:
                    primal, slope = fwAD.unpack_dual(dual)
                    outs.append(unwrap(primal, level))
                    slopes.append(unwrap(torch.zeros_like(primal) if slope is None else slope, level))
                if has_aux:
                    aux = unwrap(aux, level) if isinstance(aux, torch.Tensor) else tuple(unwrap(a, level) for a in aux)
    finally:
        et.exit_jvp_nesting()
    out: Any = outs[0] if single else tuple(outs)
    slope_out: Any = slopes[0] if single else tuple(slopes)
    return (out, slope_out, aux) if has_aux else (out, slope_out)


_decompositions_loaded = False


def _vmap_enter(batch_size: int, randomness: str) -> int:
    global _decompositions_loaded
    if not _decompositions_loaded and _lazy_load_decompositions is not None:
        _lazy_load_decompositions()
        _decompositions_loaded = True
    return int(_functorch_module._vmap_increment_nesting(batch_size, randomness))


def vmap_enter(batch_size: int, randomness: str) -> int:
    """Open a ``torch.vmap`` level (what ``torch.vmap`` does before calling ``func``); every
    call must be paired with :func:`vmap_exit`, in a ``finally``. Only where :func:`flat_ok`."""
    return _vmap_enter(batch_size, randomness)


def vmap_exit() -> None:
    """Close the level opened by :func:`vmap_enter`."""
    _functorch_module._vmap_decrement_nesting()


def add_batch_dim(t: torch.Tensor, dim: int, level: int) -> torch.Tensor:
    """``t`` batched along ``dim`` (non-negative) at vmap ``level``."""
    return _functorch_module._add_batch_dim(t, dim, level)  # type: ignore[no-any-return]


def remove_batch_dim(t: torch.Tensor, level: int, batch_size: int, dim: int) -> torch.Tensor:
    """The plain tensor of a ``level`` output, its batch dimension at ``dim`` (expanded when
    ``t`` does not vary along the batch)."""
    return _functorch_module._remove_batch_dim(t, level, batch_size, dim)  # type: ignore[no-any-return]


def vmap_leading(fn: Callable[..., Sequence[torch.Tensor]], args: Sequence[torch.Tensor], randomness: str) -> Any:
    """``torch.func.vmap(fn, randomness=randomness)(*args)`` for tensors batched along their
    first dimension and a ``fn`` returning a tuple of tensors (each batched along its first
    dimension); opens the level directly where :func:`flat_ok`."""
    if not flat_ok():
        return torch.func.vmap(fn, randomness=randomness)(*args)
    batch_size = args[0].shape[0]
    level = _vmap_enter(batch_size, randomness)
    try:
        add = _functorch_module._add_batch_dim
        outs = fn(*[add(a, 0, level) for a in args])
        remove = _functorch_module._remove_batch_dim
        return tuple(remove(o, level, batch_size, 0) for o in outs)
    finally:
        _functorch_module._vmap_decrement_nesting()


def is_batched(t: torch.Tensor) -> bool:
    """Whether ``t`` is a vmap BatchedTensor (at any level)."""
    return bool(_functorch_module.is_batchedtensor(t))


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
