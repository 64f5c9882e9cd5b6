"""A differentiable, transposable linear solve: JAX's ``custom_linear_solve`` for torch.

:class:`LinearSolve` solves ``A(ops) x = b`` with a matrix-free solver and defines its
derivatives with further solves (JAX's design), so every order of every transform works:

* reverse mode: ``b_bar = A^{-T} x_bar`` (a transposed :class:`LinearSolve`) and
  ``ops_bar = -(d/dops A(ops) x)^T b_bar``;
* forward mode: ``x_dot = A^{-1} (b_dot - (d/dops A(ops) x) ops_dot)`` (another
  :class:`LinearSolve`).

Both rules are made of ``torch.func`` products and :class:`LinearSolve` calls, so they are
differentiable in turn, and the Function carries ``generate_vmap_rule`` for ``vmap``.
The solver never runs under autograd (``forward`` sees plain or batched tensors only).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, get_args

import torch

from .._errors import report_nonconvergence
from .._tree import TreeSpec, flatten_like, tree_flatten, tree_norm, tree_unflatten
from .._validate import api_name, check_bool, check_choice, describe, fail
from ._functorch import all_true, eager_under_compile, forward_rule, plain, revive
from .cg import normal_cg
from .dispatch import SOLVERS

Tensors = tuple[torch.Tensor, ...]
MakeMatvec = Callable[[Tensors], Callable[[Tensors], Tensors]]

OnFailure = Literal["warn", "raise", "ignore"]
ON_FAILURE: tuple[OnFailure, ...] = get_args(OnFailure)
SolveName = Literal["auto", "cg", "gmres", "bicgstab", "minres", "normal_cg", "lu", "cholesky"]
SOLVES: tuple[SolveName, ...] = get_args(SolveName)
SYMMETRIC_SOLVES = ("cg", "minres", "cholesky")


# --------------------------------------------------------------------------------------
# Options.


def check_solve(solve: Any, symmetric: Any, api: str) -> tuple[Any, bool]:
    """Validate ``solve``/``symmetric``; return ``(solve, symmetric)`` with ``"auto"`` resolved.

    ``"auto"`` is ``"cg"`` for a declared symmetric Jacobian and ``"gmres"`` otherwise; the
    symmetric-only solvers (``"cg"``, ``"minres"``, ``"cholesky"``) imply ``symmetric=True``.
    """
    check_bool(symmetric, "symmetric", api)
    if callable(solve):
        return solve, symmetric
    if not isinstance(solve, str):
        raise fail(
            api,
            f"`solve` must be one of {list(SOLVES)} or a callable `solve(matvec, b)`, got {describe(solve)}.",
            TypeError,
        )
    if solve not in SOLVES:
        raise fail(
            api,
            f"`solve` must be one of {list(SOLVES)} or a callable `solve(matvec, b)` (for example "
            f"`functools.partial(functx.solvers.gmres, rtol=1e-10)`), got {solve!r}.",
        )
    if solve == "auto":
        solve = "cg" if symmetric else "gmres"
    return solve, symmetric or solve in SYMMETRIC_SOLVES


def check_throw(throw: Any, on_failure: Any, api: str) -> tuple[bool, bool]:
    """``(throw, warn)`` from ``throw`` and the deprecated ``on_failure``.

    ``throw=True`` raises :class:`functx.NonConvergenceError`; ``throw=False`` warns with
    :class:`functx.NonConvergenceWarning` (an implicit function's caller has no result to
    read a flag from). ``on_failure`` (deprecated, one release) maps ``"raise"`` to
    ``throw=True``, ``"warn"`` to ``throw=False`` and ``"ignore"`` to ``throw=False`` without
    the warning (the one behaviour ``throw`` has no spelling for: filter
    ``functx.NonConvergenceWarning`` instead).
    """
    check_bool(throw, "throw", api)
    if on_failure is None:
        return throw, True
    choice = check_choice(on_failure, "on_failure", ON_FAILURE, api)
    spelled = {"raise": "throw=True", "warn": "throw=False", "ignore": "throw=False and a warnings filter"}[choice]
    warnings.warn(
        f"{api_name(api)}: `on_failure` is deprecated and will be removed in the next release; "
        f"on_failure={choice!r} is {spelled} (functx.NonConvergenceError / NonConvergenceWarning).",
        FutureWarning,
        stacklevel=4,
    )
    if throw and choice != "raise":
        raise fail(api, f"`on_failure` must be None or 'raise' with throw=True, got {choice!r}.")
    return throw or choice == "raise", choice != "ignore"


def report(
    ok: torch.Tensor,
    throw: bool,
    warn: bool,
    api: str,
    message: Callable[[], str],
    stats: Callable[[], Mapping[str, Any]] | None = None,
) -> None:
    """Raise (``throw``) or warn (``warn``) when ``ok`` is False in any lane (see
    :func:`all_true`; nothing is reported where the flag cannot be read)."""
    if not (throw or warn) or all_true(ok) in (None, True):
        return
    report_nonconvergence(api, message(), {} if stats is None else stats(), throw, warn, stacklevel=4)


def _worst(t: torch.Tensor) -> str:
    values = plain(t.detach())
    return f"{float(values.max()):.3g}" if values.numel() else "n/a"


# --------------------------------------------------------------------------------------
# The operator.


@dataclasses.dataclass(frozen=True)
class Operator:
    """A square linear operator ``A(ops)`` on the pytree space ``spec``, and how to solve it.

    ``make_matvec(ops)`` returns ``v -> A(ops) v`` on flat tuples of leaves (it may do
    preparatory work once, e.g. build a pullback); ``make_rmatvec`` does the same for the
    transpose. ``ops`` are the operand tensors, the first ``n_diff`` of which are
    differentiable. ``role`` names the solve in reports: "adjoint" for solves with the
    transpose (reverse mode), "tangent" for solves with ``A`` (forward mode).
    """

    make_matvec: MakeMatvec
    make_rmatvec: MakeMatvec
    spec: TreeSpec
    n_diff: int
    solve: Any
    throw: bool
    warn: bool
    api: str
    role: str

    @property
    def n(self) -> int:
        return self.spec.num_leaves

    def transpose(self, role: str) -> Operator:
        """``A^T``, reported as ``role``."""
        return dataclasses.replace(self, make_matvec=self.make_rmatvec, make_rmatvec=self.make_matvec, role=role)

    def with_role(self, role: str) -> Operator:
        return self if role == self.role else dataclasses.replace(self, role=role)

    # -- solving ----------------------------------------------------------------------
    def run(self, ops: Tensors, b: Tensors) -> Tensors:
        """Solve ``A(ops) x = b`` (plain or batched tensors, no autograd); report failures."""
        matvec = self.make_matvec(ops)
        tree_matvec = lambda v: tree_unflatten(self.spec, matvec(tuple(tree_flatten(v)[0])))
        b_tree = tree_unflatten(self.spec, b)
        result = self._call_solver(tree_matvec, b_tree, ops)
        if _is_solution(result):
            x, ok, residual = result.value, result.converged, result.residual_norm
            iterations = _num_steps(result)
        else:
            x, ok, residual, iterations = result, None, None, None
        x_leaves = self._check_x(x, b)
        if ok is None:  # a user solve without a convergence report: check the residual
            ok, residual = _residual_ok(matvec, x_leaves, b)
        report(
            ok,
            self.throw,
            self.warn,
            self.api,
            lambda: self._failure_message(residual, iterations),
            lambda: _stats(residual, iterations),
        )
        return tuple(leaf.detach().clone() if any(leaf is t for t in b) else leaf.detach() for leaf in x_leaves)

    def _call_solver(self, matvec: Callable[[Any], Any], b: Any, ops: Tensors) -> Any:
        if callable(self.solve):  # user code: a copy of b, never the caller's cotangents/tangents
            return self.solve(matvec, tree_unflatten(self.spec, [t.clone() for t in tree_flatten(b)[0]]))
        if self.solve == "normal_cg":
            rmatvec = self.make_rmatvec(ops)
            tree_rmatvec = lambda u: tree_unflatten(self.spec, rmatvec(tuple(tree_flatten(u)[0])))
            return normal_cg(matvec, b, rmatvec=tree_rmatvec)
        return SOLVERS[self.solve](matvec, b)

    def _check_x(self, x: Any, b: Tensors) -> list[torch.Tensor]:
        return flatten_like(
            x,
            self.spec,
            b,
            name="x",
            root="solve(matvec, b)",
            api=self.api,
            ref="its right-hand side `b`",
            what="the linear `solve`'s result (a pytree, or a `functx.solvers.Solution`)",
        )

    def _failure_message(self, residual: torch.Tensor | None, iterations: torch.Tensor | None) -> str:
        details = "" if residual is None else f" (residual norm {_worst(residual)}"
        if details and iterations is not None:
            details += f" after {int(plain(iterations).max())} iterations"
        details += ")" if details else ""
        return (
            f"the {self.role} linear solve (solve={_solve_name(self.solve)}) did not "
            f"converge{details}, so the implicit derivatives are inaccurate. Try a different `solve` "
            f"(e.g. 'gmres' for a nonsymmetric Jacobian, 'lu' for small problems), more iterations "
            f"(`functools.partial(functx.solvers.gmres, max_iter=...)`), or check that the Jacobian of "
            f"the optimality function is invertible at the solution."
        )

    # -- derivative pieces --------------------------------------------------------------
    def _apply_at(self, x: Tensors, static: Tensors) -> Callable[..., Tensors]:
        """``diff_ops -> A(diff_ops, static) x``: the operator applied to a fixed ``x``."""
        return lambda *diff: tuple(self.make_matvec(tuple(diff) + tuple(static))(x))

    def ops_vjp(self, ops: Tensors, x: Tensors, cotangent: Tensors) -> Tensors:
        """``-(d/dops A(ops) x)^T cotangent`` for the differentiable operands."""
        diff, static = ops[: self.n_diff], ops[self.n_diff :]
        if not diff:
            return ()
        pullback = torch.func.vjp(self._apply_at(x, static), *diff)[1]
        return tuple(-g for g in pullback(tuple(cotangent)))

    def ops_jvp(self, ops: Tensors, x: Tensors, tangents: Sequence[torch.Tensor | None]) -> Tensors | None:
        """``(d/dops A(ops) x) ops_dot``, or ``None`` when no operand has a tangent."""
        diff, static = ops[: self.n_diff], ops[self.n_diff :]
        if all(t is None for t in tangents):
            return None
        tangents = tuple(torch.zeros_like(d) if t is None else t for d, t in zip(diff, tangents))
        return torch.func.jvp(self._apply_at(x, static), tuple(diff), tangents)[1]


def _is_solution(result: Any) -> bool:
    """A :class:`functx.solvers.Solution`, or any object with its statistics (``num_steps``,
    or the deprecated ``iterations``)."""
    if isinstance(result, torch.Tensor):
        return False
    fields = ("value", "converged", "residual_norm")
    return all(hasattr(result, name) for name in fields) and (
        hasattr(result, "num_steps") or hasattr(result, "iterations")
    )


def _num_steps(result: Any) -> torch.Tensor:
    return result.num_steps if hasattr(result, "num_steps") else result.iterations


def _stats(residual: torch.Tensor | None, steps: torch.Tensor | None) -> dict[str, Any]:
    stats: dict[str, Any] = {"converged": False}
    if residual is not None:
        stats["residual_norm"] = float(plain(residual.detach()).max())
    if steps is not None:
        stats["num_steps"] = int(plain(steps).max())
    return stats


def _residual_ok(
    matvec: Callable[[Tensors], Tensors], x: Sequence[torch.Tensor], b: Tensors
) -> tuple[torch.Tensor, torch.Tensor]:
    """For solves that report nothing: ``||b - A x|| <= sqrt(eps) ||b||``."""
    r = [bi - ai for bi, ai in zip(b, matvec(tuple(x)))]
    residual = norm(r)
    eps = torch.finfo(b[0].dtype if b[0].is_floating_point() else torch.float32).eps
    return residual <= math.sqrt(eps) * norm(list(b)), residual


def norm(leaves: Sequence[torch.Tensor]) -> torch.Tensor:
    """The Euclidean norm of a list of tensors, for checks only (no gradient)."""
    return tree_norm([leaf.detach() for leaf in leaves])


def _solve_name(solve: Any) -> str:
    if isinstance(solve, str):
        return repr(solve)
    if isinstance(solve, functools.partial):
        return _solve_name(solve.func)
    return getattr(solve, "__name__", None) or type(solve).__name__


# --------------------------------------------------------------------------------------
# The Function.


class LinearSolve(torch.autograd.Function):
    """``x = A(ops)^{-1} b`` with solve-based derivative rules; inputs ``(op, *b, *ops)``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(op: Operator, *tensors: torch.Tensor) -> Tensors:
        return op.run(tensors[op.n :], tensors[: op.n])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensors) -> None:
        op = inputs[0]
        ctx.op = op
        ctx.save_for_backward(*inputs[1 + op.n :], *output)
        ctx.save_for_forward(*inputs[1 + op.n :], *output)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        op = ctx.op
        saved, x_bar = revive(ctx.saved_tensors), revive(grads)
        ops, x = saved[: -op.n], saved[-op.n :]
        b_bar = solve(op.transpose("adjoint"), ops, x_bar)
        ops_bar = op.ops_vjp(ops, x, b_bar)
        return (None, *b_bar, *ops_bar, *([None] * (len(ops) - op.n_diff)))

    @staticmethod
    def jvp(ctx: Any, *tangents: torch.Tensor | None) -> Tensors:
        op = ctx.op
        b_dot, ops_dot = tangents[1 : 1 + op.n], tangents[1 + op.n : 1 + op.n + op.n_diff]
        with forward_rule(ctx.saved_tensors, op.api) as saved:
            ops, x = saved[: -op.n], saved[-op.n :]
            rhs = [torch.zeros_like(xi) if t is None else t for xi, t in zip(x, b_dot)]
            moved = op.ops_jvp(ops, x, ops_dot)
            if moved is not None:
                rhs = [r - m for r, m in zip(rhs, moved)]
            return solve(op.with_role("tangent"), ops, tuple(rhs))


@eager_under_compile
def solve(op: Operator, ops: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> Tensors:
    """``A(ops)^{-1} b`` on flat leaves, differentiable in ``b`` and the first ``op.n_diff`` ops
    (eager at a graph break under ``torch.compile``, see :func:`eager_under_compile`)."""
    return LinearSolve.apply(op, *b, *ops)
