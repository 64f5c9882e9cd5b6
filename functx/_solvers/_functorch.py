"""The torch.func machinery that the differentiable linear solve, the solvers' vmap early
stop and implicit differentiation need (torch has no public API for it). Every private torch
name it uses is an entry of :mod:`functx._torch_internals` (its last section), with the
guard and the fallback there; this module imports none.

1. **Forward-over-forward through an ``autograd.Function``** (pytorch/pytorch#197867).
   torch calls a Function's ``jvp`` staticmethod with forward AD switched off globally, so
   every *outer* forward-mode level (``jacfwd(jacfwd(f))``, ``jvp(jvp(f))``) sees the rule as
   a constant: second and higher forward derivatives come out silently wrong (zero terms).
   :func:`forward_rule` fixes this: it removes the running level's tangent from the saved
   tensors (unwrap one functorch level, rewrap without a tangent) and then switches forward
   AD back on, so that the rule is recorded by the outer levels and not by its own.
   :func:`forward_over_forward_ok` checks, once per process, that this fix gives the right
   third derivative of ``x**4`` on the installed torch; when it does not, the rules raise a
   clear error for nested forward mode instead of returning wrong numbers.
2. **Reading a flag in every ``vmap`` lane** (:func:`all_true`): the flag is a batched
   tensor; we peel the functorch wrappers to read every lane at once, for failure reports
   and for the iterative solvers' early stop (a value read there never flows back into
   the computation, it only decides whether more masked no-op iterations run).
3. **Peeling wrappers** (:func:`peel`, :func:`jvp_levels`) for implicit differentiation's
   closure-capture and dual-number checks (:mod:`functx._implicit._capture`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.autograd.forward_ad as fwAD

from .. import _torch_internals as ti

T = TypeVar("T")


def _have_internals() -> bool:
    """Whether every private name the rules need is available (see
    :func:`functx._torch_internals.rule_internals_available`); where not, the rules refuse
    with a clear error."""
    return ti.rule_internals_available()


def jvp_levels() -> list[int]:
    """The levels of the live forward-mode (``jvp``/``jacfwd``) transforms."""
    return ti.transform_levels(forward_only=True)


# --------------------------------------------------------------------------------------
# 1. Forward-mode rules.


@contextlib.contextmanager
def forward_rule(saved: Sequence[torch.Tensor], api: str, *, check: bool = True) -> Iterator[list[torch.Tensor]]:
    """Context for the body of a ``jvp`` staticmethod; yields the usable saved tensors.

    Inside, forward AD is enabled for every level but the running one (whose tangent has
    been removed from the saved tensors), so the rule is differentiable by outer
    forward-mode transforms exactly as by outer reverse-mode ones. With ``check``, nested
    forward mode is refused when :func:`forward_over_forward_ok` fails.
    """
    if not _have_internals():
        ti.require(None, "forward-mode differentiation of an implicit function or linear solve", api)
    jvp_levels = ti.transform_levels(forward_only=True)
    if not jvp_levels:  # pragma: no cover - plain dual numbers are refused at call time
        yield [fwAD.unpack_dual(t).primal for t in saved]
        return
    if check and len(jvp_levels) > 1 and not forward_over_forward_ok():
        raise NotImplementedError(
            f"`functx.{api}`: forward-over-forward differentiation (jacfwd(jacfwd(f)), jvp of a "
            f"jvp) through an implicit function gives wrong results with torch "
            f"{torch.__version__} (pytorch/pytorch#197867), so functx refuses it. Put a "
            f"reverse-mode transform on one side instead: `functx.hessian(f, mode='fwd-rev')`, "
            f"`jacfwd(jacrev(f))`, `jacrev(jacfwd(f))` or `hvp(..., mode='rev-rev')`."
        )
    level = max(jvp_levels)
    with ti.set_fwd_grad_enabled(True):  # type: ignore[misc]
        yield [ti.strip_tangent(t, level) for t in saved]


class _Probe(torch.autograd.Function):
    """``x -> x**2`` with the same rule machinery as the implicit Functions."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x * x

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 2 * x * g

    @staticmethod
    def jvp(ctx: Any, dx: torch.Tensor) -> torch.Tensor:
        with forward_rule(ctx.saved_tensors, "probe", check=False) as (x,):
            return 2 * x * dx


@functools.cache
def forward_over_forward_ok() -> bool:
    """Whether :func:`forward_rule` gives exact nested forward derivatives on this torch.

    Checks the first three derivatives of ``x**4 = Probe(Probe(x))`` at ``x = 3`` by
    ``jacfwd``, ``jacfwd(jacfwd)`` and ``jacfwd(jacfwd(jacfwd))`` (108, 108, 72).
    """
    if not _have_internals():
        return False
    jacfwd = torch.func.jacfwd
    f = lambda x: _Probe.apply(_Probe.apply(x))
    x = torch.tensor(3.0, dtype=torch.float64)
    try:
        with torch.enable_grad(), ti.set_fwd_grad_enabled(True):  # type: ignore[misc]
            got = [jacfwd(f)(x), jacfwd(jacfwd(f))(x), jacfwd(jacfwd(jacfwd(f)))(x)]
    except Exception:  # pragma: no cover - a torch change broke the fix: refuse, never guess
        return False
    return all(abs(float(g) - w) < 1e-9 for g, w in zip(got, (108.0, 108.0, 72.0)))


def revive(tensors: Sequence[Any]) -> list[Any]:
    """Unwrap dead functorch wrappers (of transforms that have exited), as torch's own
    operators do implicitly: a ``vjp_fn`` called after its ``vjp`` returned runs backward
    rules on such tensors, and nested ``torch.func`` calls cannot take them as inputs."""
    return [ti.unwrap_dead(t) for t in tensors]


# --------------------------------------------------------------------------------------
# 2. Reading flags for reports.


def all_true(flag: torch.Tensor) -> bool | None:
    """``bool(flag.all())`` for every vmap lane, or ``None`` where it cannot be read
    (under ``torch.compile``/tracing, or on fake/meta tensors)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return None
    if not ti.CAN_UNWRAP and ti.transforms_active():
        # Unsure whether a transform runs (internals unavailable): read the flag as it is; a
        # vmap-batched flag refuses (data-dependent control flow) and is then unreadable.
        if type(flag) not in (torch.Tensor, torch.nn.Parameter) or flag.device.type == "meta":
            return None
        try:
            return bool(flag.all())
        except RuntimeError:
            return None
    t = ti.unwrap_all(flag)
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type == "meta":
        return None
    return bool(t.all())


def plain(t: torch.Tensor) -> torch.Tensor:
    """The tensor under every functorch wrapper (all vmap lanes), for report messages."""
    return ti.unwrap_all(t)


COMPILE_LIMITATION = (
    "functx.implicit runs eagerly: torch.compile (torch 2.13) inlines an autograd.Function's "
    "forward inside torch.func transforms and drops its custom derivative rules (implicit "
    "derivatives would be silently zero), so functx marks implicit differentiation as not "
    "traceable. Without fullgraph=True, torch.compile runs the implicit function's value "
    "(and vmap of it) eagerly at a graph break; for derivatives, apply the transform outside "
    "torch.compile."
)


def eager_under_compile(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn``, run eagerly at a graph break when called inside ``torch.compile`` (and refused,
    with :data:`COMPILE_LIMITATION` as the reason, under ``fullgraph=True``); eager calls pay
    nothing."""
    disabled = torch.compiler.disable(fn, reason=COMPILE_LIMITATION)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        if torch.compiler.is_compiling():
            return disabled(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


def peel(t: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
    """One functorch wrapper off ``t``: ``(inner, whether it was a grad/jvp wrapper)``, or
    ``None`` when ``t`` is not wrapped (or the internals are missing)."""
    chain = ti.wrapper_chain(t)
    if len(chain) == 1:
        return None
    return chain[1], ti.is_grad_wrapper(t)
