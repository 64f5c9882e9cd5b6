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
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._core import check_bool
from .._errors import NonConvergenceError, NonConvergenceWarning
from .._tree import TreeSpec, describe, flatten_like, tree_flatten, tree_norm, tree_unflatten
from ._functorch import all_true, eager_under_compile, forward_rule, plain, revive
from .cg import normal_cg
from .dispatch import SOLVERS

Tensors = tuple[torch.Tensor, ...]
MakeMatvec = Callable[[Tensors], Callable[[Tensors], Tensors]]

ON_FAILURE = ("warn", "raise", "ignore")
SOLVES = ("auto", "cg", "gmres", "bicgstab", "minres", "normal_cg", "lu", "cholesky")
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
        raise TypeError(
            f"`functx.{api}`: `solve` must be one of {list(SOLVES)} or a callable "
            f"`solve(matvec, b)`, got {describe(solve)}."
        )
    if solve not in SOLVES:
        raise ValueError(
            f"`functx.{api}`: unknown `solve={solve!r}`; expected one of {list(SOLVES)} or a callable "
            f"`solve(matvec, b)` (for example `functools.partial(functx.solvers.gmres, rtol=1e-10)`)."
        )
    if solve == "auto":
        solve = "cg" if symmetric else "gmres"
    return solve, symmetric or solve in SYMMETRIC_SOLVES


def check_on_failure(on_failure: Any, api: str) -> str:
    if on_failure not in ON_FAILURE:
        raise ValueError(f"`functx.{api}`: `on_failure` must be one of {list(ON_FAILURE)}, got {on_failure!r}.")
    return on_failure


def report(ok: torch.Tensor, on_failure: str, message: Callable[[], str]) -> None:
    """Warn or raise when ``ok`` is False in any lane (see :func:`all_true`)."""
    if on_failure == "ignore" or all_true(ok) in (None, True):
        return
    if on_failure == "raise":
        raise NonConvergenceError(message())
    warnings.warn(message(), NonConvergenceWarning, stacklevel=3)


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
    on_failure: str
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
            iterations = result.iterations
        else:
            x, ok, residual, iterations = result, None, None, None
        x_leaves = self._check_x(x, b)
        if ok is None:  # a user solve without a convergence report: check the residual
            ok, residual = _residual_ok(matvec, x_leaves, b)
        report(ok, self.on_failure, lambda: self._failure_message(residual, iterations))
        return tuple(leaf.detach().clone() if any(leaf is t for t in b) else leaf.detach() for leaf in x_leaves)

    def _call_solver(self, matvec: Callable[[Any], Any], b: Any, ops: Tensors) -> Any:
        if callable(self.solve):
            return self.solve(matvec, b)
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
            f"`functx.{self.api}`: the {self.role} linear solve (solve={_solve_name(self.solve)}) did not "
            f"converge{details}, so the implicit derivatives are inaccurate. Try a different `solve` "
            f"(e.g. 'gmres' for a nonsymmetric Jacobian, 'lu' for small problems), more iterations "
            f"(`functools.partial(functx.solvers.gmres, max_iter=...)`), or check that the Jacobian of "
            f"the optimality function is invertible at the solution. Pass on_failure='raise' to make this "
            f"an error, or 'ignore' to silence it."
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
    return all(hasattr(result, name) for name in ("value", "converged", "residual_norm", "iterations"))


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
