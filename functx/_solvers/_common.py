"""The protocol and the machinery every solver shares.

* :class:`Solution` is what every solver returns; :func:`conclude` applies the failure
  policy (``throw``, see :mod:`functx._errors`).
* :class:`Layout` maps a pytree of tensors to one flat vector and back, checking the
  structure, shapes and dtypes of everything that comes back from user callables. The
  kernels work on flat 1-D tensors: one tensor op per vector update, whatever the tree.
* :class:`LinearProblem` is a validated system ``(A + ridge I) x = b`` on flat vectors.
* :func:`iterate` is the one loop driver: a fixed trip count with masked updates (the
  state of a lane that has converged is frozen with ``torch.where``), and an early exit
  only in plain eager mode (see :func:`early_exit_allowed`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from .._core import plain_eager
from .._errors import report_nonconvergence
from .._torch_internals import version
from .._tree import FlatLayout, PyTree, flatten_float, flatten_like
from .._validate import check_bool, check_callable, check_int, check_tolerance, describe, fail, is_number
from ._functorch import all_true, plain

MAX_ITER_FACTOR = 10
MAX_ITER_CAP = 1000

# Default relative tolerance on the residual, by real dtype (complex dtypes use their real
# counterpart). float64: a well-conditioned system is solved to ~1e-10 relative error or
# better; float32: a few digits above the round-off floor of the true residual.
DEFAULT_RTOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}


class Solution(NamedTuple):
    """The result of a linear solve: ``(value, num_steps, residual_norm, converged)``.

    The statistics carry the names of every iterative routine of functx
    (:mod:`functx._errors`); ``iterations`` is a deprecated alias of ``num_steps``.

    Attributes:
        value: the solution ``x``, a pytree with the structure, shapes and dtypes of ``b``
            (of ``x0`` for :func:`~functx.solvers.normal_cg`).
        num_steps: number of iterations run (what ``max_iter`` bounds), an int64 0-d
            tensor (``0`` for the dense solvers).
        residual_norm: the final residual norm ``||b - (A + ridge I) x||``, recomputed
            from ``x`` (not a recursive estimate), a real 0-d tensor. For
            :func:`~functx.solvers.normal_cg` it is the residual of the normal equations.
        converged: ``residual_norm <= max(atol, rtol * ||b||)``, a bool 0-d tensor (for
            the dense solvers, ``residual_norm <= max(atol, rtol (||A||_F ||x|| + ||b||))``
            and the factorisation succeeded).
    """

    value: PyTree
    num_steps: torch.Tensor
    residual_norm: torch.Tensor
    converged: torch.Tensor

    @property
    def iterations(self) -> torch.Tensor:
        """Deprecated alias of :attr:`num_steps` (removed in the next release)."""
        warnings.warn(
            "`functx.solvers.Solution.iterations` is deprecated and will be removed in the next release; "
            "use `Solution.num_steps` (the name every functx iterative routine uses).",
            FutureWarning,
            stacklevel=2,
        )
        return self.num_steps


# --------------------------------------------------------------------------------------
# Option validation.


def default_rtol(dtype: torch.dtype) -> float:
    real = dtype.to_real() if dtype.is_complex else dtype
    return DEFAULT_RTOL.get(real, 1e-5)


def default_max_iter(n: int) -> int:
    return min(MAX_ITER_FACTOR * n, MAX_ITER_CAP)


def check_ridge(ridge: Any, api: str) -> float | torch.Tensor | None:
    """``None``, a finite real number, or a real floating-point 0-d tensor (differentiable)."""
    if ridge is None:
        return None
    if is_number(ridge):
        if not math.isfinite(ridge):
            raise fail(api, f"`ridge` must be finite, got {ridge!r}.")
        return None if ridge == 0 else float(ridge)
    if isinstance(ridge, torch.Tensor) and ridge.is_floating_point():
        if ridge.dim() != 0:
            raise fail(
                api,
                f"`ridge` must be a number or a 0-d tensor, got {describe(ridge)}. Use `functx.vmap` to "
                f"solve for several ridges.",
            )
        return ridge
    raise fail(api, f"`ridge` must be None, a float or a real 0-d tensor, got {describe(ridge)}.", TypeError)


def check_options(api: str, dtype: torch.dtype, size: int, rtol: Any, atol: Any, max_iter: Any, throw: Any) -> Any:
    """``(rtol, atol, max_iter, throw)`` validated, with the dtype/size-dependent defaults."""
    rtol = check_tolerance(rtol, "rtol", api, default_rtol(dtype))
    atol = check_tolerance(atol, "atol", api, 0.0)
    max_iter = default_max_iter(size) if max_iter is None else check_int(max_iter, "max_iter", api, minimum=0)
    return rtol, atol, max_iter, check_bool(throw, "throw", api)


# --------------------------------------------------------------------------------------
# Pytrees <-> flat vectors.


class Layout(FlatLayout):
    """The flat-vector layout of a pytree of floating-point or complex tensors (core's
    :class:`~functx._tree.FlatLayout`), and the check of everything that comes back from
    user callables against it (:func:`~functx._tree.flatten_like`)."""

    def __init__(self, tree: PyTree, name: str, api: str) -> None:
        leaves, spec = flatten_float(tree, name=name, api=api, nonempty=True, hint="")
        super().__init__(leaves, spec, name=name, api=api)
        self.like = leaves

    def check(self, tree: PyTree, root: str, what: str) -> list[torch.Tensor]:
        """The leaves of ``tree``, checked against this layout; ``what`` names ``tree`` in errors."""
        return flatten_like(
            tree, self.spec, self.like, name=root, api=self.api, ref=f"`{self.name}`", root=root, what=what
        )

    def ravel(self, tree: PyTree, root: str, what: str) -> torch.Tensor:
        return self.ravel_leaves(self.check(tree, root, what))


Flat = Callable[[torch.Tensor], torch.Tensor]


def flat_map(
    fn: Callable[[PyTree], PyTree],
    source: Layout,
    target: Layout,
    name: str,
    arg: str,
    count: list[int] | None = None,
) -> Flat:
    """``fn`` (pytree of ``source`` layout -> pytree of ``target`` layout) on flat vectors,
    checking every output. ``name(arg)`` is how outputs are named in errors; ``count[0]``
    (if given) counts the calls (operator products, for failure reports).

    ``fn`` is user code: an error that says two dtypes differ is named (the operator has
    another dtype than ``b``), and a write to its input in place (which would corrupt the
    solver's state) raises ``ValueError`` in eager mode (read from the version counter, which
    inference tensors do not have: not checked under ``torch.inference_mode()``)."""
    root, what = f"{name}({arg})", f"the output of `{name}`"
    api = source.api

    def apply(v: torch.Tensor) -> torch.Tensor:
        if count is not None:
            count[0] += 1
        before = None if torch.compiler.is_compiling() or v.is_inference() else version(v)  # no counter
        try:
            out = fn(source.unravel(v))
        except RuntimeError as err:
            raise_dtype_hint(err, api, name, arg, source)
            raise
        if before is not None and version(v) != before:
            raise fail(
                api,
                f"`{name}` wrote its argument `{arg}` in place (for example `{arg}.mul_(0.5)` or "
                f"`{arg}.zero_()`), which would corrupt the solver's iterates. Return a new tensor instead.",
            )
        return target.ravel(out, root, what)

    return apply


def raise_dtype_hint(err: RuntimeError, api: str, name: str, arg: str, layout: Layout) -> None:
    """A ``TypeError`` naming the dtypes for torch's dtype-mismatch errors inside user code
    (``addmv``, ``mm``...); returns for any other error."""
    text = str(err)
    if "dtype" not in text and "scalar type" not in text:
        return
    raise fail(
        api,
        f"`{name}` failed on `{arg}`, shaped like `{layout.name}` with dtype {layout.dtype}: its operator "
        f"most likely has another dtype than `{layout.name}`. Cast the operator (or `{layout.name}`) so that "
        f"their dtypes agree. The error was: {text}",
        TypeError,
    ) from err


def owned(flat: torch.Tensor, leaves: Sequence[torch.Tensor]) -> torch.Tensor:
    """``flat`` as a vector that shares no storage with the caller's ``leaves``: a solver
    hands its vectors to user callables, which must never receive the caller's tensors."""
    return flat.clone() if len(leaves) == 1 else flat  # several leaves: `torch.cat` copied them


def shifted(op: Flat, ridge: float | torch.Tensor | None) -> Flat:
    """``v -> op(v) + ridge * v``."""
    if ridge is None:
        return op
    return lambda v: op(v) + ridge * v


# --------------------------------------------------------------------------------------
# A validated problem on flat vectors.


# The loops stop when their (recursive) residual estimate reaches LOOP_MARGIN * tol; the
# verdict is then taken on the true residual against tol. The margin absorbs the drift
# between recursive and true residuals, a few iterations' worth.
LOOP_MARGIN = 0.5


class LinearProblem(NamedTuple):
    """``(A + ridge I) x = b`` on flat vectors; ``A`` already includes the ridge."""

    layout: Layout  # of the solution x
    b: torch.Tensor  # never the caller's storage (see `owned`)
    x0: torch.Tensor | None  # None: start from zero (saves a matvec); never the caller's storage
    A: Flat
    M: Flat | None  # preconditioner, an approximation of A^{-1}
    tol: torch.Tensor  # real 0-d: max(atol, rtol * ||b||), the convergence verdict
    max_iter: int
    early_exit: bool
    throw: bool = False
    products: list[int] | None = None  # products with A so far (a Python count, for reports)

    @property
    def target(self) -> torch.Tensor:
        """What the loops aim for: ``LOOP_MARGIN * tol``."""
        return self.tol * LOOP_MARGIN

    def start(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The initial iterate and its residual."""
        if self.x0 is None:
            return torch.zeros_like(self.b), self.b
        return self.x0, self.b - self.A(self.x0)

    def precondition(self, r: torch.Tensor) -> torch.Tensor:
        return r if self.M is None else self.M(r)


def threshold(b: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    """``max(atol, rtol * ||b||)`` as a real 0-d tensor (no gradient)."""
    return torch.clamp(torch.linalg.vector_norm(b.detach()) * rtol, min=atol)


def setup(
    api: str,
    matvec: Any,
    b: PyTree,
    x0: PyTree,
    *,
    rtol: Any,
    atol: Any,
    max_iter: Any,
    preconditioner: Any,
    ridge: Any,
    throw: Any,
) -> LinearProblem:
    """Validate the arguments of a square solve and build its :class:`LinearProblem`."""
    check_callable(matvec, "matvec", api)
    check_callable(preconditioner, "preconditioner", api, optional=True)
    layout = Layout(b, "b", api)
    rtol, atol, max_iter, throw = check_options(api, layout.dtype, layout.size, rtol, atol, max_iter, throw)
    ridge = check_ridge(ridge, api)
    flat_b = owned(layout.ravel(b, "b", "`b`"), layout.like)
    flat_x0 = None if x0 is None else owned(layout.ravel(x0, "x0", "`x0`"), layout.like)
    products = [0]
    A = shifted(flat_map(matvec, layout, layout, "matvec", "x", products), cast_ridge(ridge, layout))
    M = None if preconditioner is None else flat_map(preconditioner, layout, layout, "preconditioner", "r")
    return LinearProblem(
        layout,
        flat_b,
        flat_x0,
        A,
        M,
        threshold(flat_b, rtol, atol),
        max_iter,
        early_exit_allowed(flat_b, flat_x0),
        throw,
        products,
    )


def cast_ridge(ridge: float | torch.Tensor | None, layout: Layout) -> float | torch.Tensor | None:
    if isinstance(ridge, torch.Tensor):
        return ridge.to(layout.real_dtype)
    return ridge


# --------------------------------------------------------------------------------------
# Transform-safe iteration.


def early_exit_allowed(*tensors: torch.Tensor | None) -> bool:
    """Whether a solver may stop early by reading a tensor value (``bool(active)``) and skip
    the masking: only in plain eager mode (see ``functx._core.plain_eager``). Elsewhere the
    solvers run masked iterations and stop when :func:`stop` sees every lane done."""
    return plain_eager(*tensors)


LARGE_MAX_ITER = 10_000


def warn_fixed_trip_count(active: torch.Tensor, max_iter: int, early_exit: bool) -> None:
    """Warn when a large ``max_iter`` will run in full because no flag can be read (tracing,
    fake tensors). Not under ``torch.compile``: a warning would break ``fullgraph=True``, and
    compiling unrolls every iteration anyway (documented instead)."""
    if early_exit or max_iter <= LARGE_MAX_ITER or torch.compiler.is_compiling():
        return
    if all_true(~active) is None:
        warnings.warn(
            f"`functx.solvers`: max_iter={max_iter} iterations will all run: under this transform "
            f"or tracer the convergence flags cannot be read, so the solver cannot stop early. Pass "
            f"a smaller `max_iter`.",
            RuntimeWarning,
            stacklevel=4,
        )


def stop(active: torch.Tensor, early_exit: bool) -> bool:
    """Whether no lane is active any more, so the remaining iterations may be skipped.

    In plain eager mode this is ``not bool(active)``. Under transforms (``vmap``, ``grad``,
    ``jvp``... in eager mode) the flag is read in every lane at once under the functorch
    wrappers (:func:`~functx._solvers._functorch.all_true`): once every lane has converged,
    the remaining masked iterations would be no-ops in values and derivatives, so stopping
    changes nothing but the time. Where the flag cannot be read (``torch.compile``,
    tracing, fake tensors) the loop keeps its fixed trip count of ``max_iter``.
    """
    if early_exit:
        return not bool(active)
    return all_true(~active) is True


def norm(v: torch.Tensor) -> torch.Tensor:
    """Euclidean norm, for convergence tests only (no gradient)."""
    return torch.linalg.vector_norm(v.detach())


def div(num: torch.Tensor, den: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``ok``, else 0; never evaluates a division by zero (so neither the
    value nor any derivative is inf or NaN in masked lanes)."""
    safe = torch.where(ok, den, 1.0)
    return torch.where(ok, num / safe, 0.0)


def safe_sqrt(t: torch.Tensor) -> torch.Tensor:
    """``sqrt(max(t, 0))`` whose derivative is 0 (not inf or NaN) where ``t <= 0``."""
    ok = t > 0
    return torch.where(ok, torch.sqrt(torch.where(ok, t, torch.ones_like(t))), 0.0)


def select(active: torch.Tensor, new: Any, old: Any) -> Any:
    """Masked update of a NamedTuple of tensors: ``new`` where ``active``, else ``old``."""
    return type(old)(*(torch.where(active, n, o) for n, o in zip(new, old)))


Step = Callable[[Any, torch.Tensor], tuple[Any, torch.Tensor]]


def iterate(step: Step, state: Any, active: torch.Tensor, max_iter: int, early_exit: bool) -> tuple[Any, torch.Tensor]:
    """Run ``step`` at most ``max_iter`` times; return ``(state, iterations)``.

    ``step(state, active)`` returns ``(new_state, not_done)``. A lane stops being active
    once ``not_done`` is False; its state is frozen from then on. The loop stops as soon
    as :func:`stop` sees no active lane; with ``early_exit`` (plain eager mode) no masking
    is needed since every executed step is active.
    """
    iterations = torch.zeros((), dtype=torch.int64, device=active.device)
    warn_fixed_trip_count(active, max_iter, early_exit)
    for _ in range(max_iter):
        if stop(active, early_exit):
            break
        if early_exit:
            state, not_done = step(state, active)
        else:
            new, not_done = step(state, active)
            state = select(active, new, state)
        iterations = iterations + active.to(torch.int64)
        active = active & not_done
    return state, iterations


def finish(
    problem: LinearProblem, x: torch.Tensor, iterations: torch.Tensor, residual: torch.Tensor | None = None
) -> Solution:
    """Package ``x``: recompute the true residual (unless given) and the converged flag."""
    if residual is None:
        residual = problem.b - problem.A(x)
    residual_norm = torch.linalg.vector_norm(residual)
    solution = Solution(problem.layout.unravel(x), iterations, residual_norm, residual_norm <= problem.tol)
    products = None if problem.products is None else problem.products[0]
    return conclude(problem.layout.api, solution, problem.throw, problem.tol, problem.max_iter, num_matvecs=products)


ITERATIVE_HINT = (
    "Raise `max_iter`, loosen `rtol`/`atol`, add a `preconditioner` or a `ridge`, or choose a solver suited to "
    "the operator."
)


def conclude(
    api: str,
    solution: Solution,
    throw: bool,
    tol: torch.Tensor | float,
    max_iter: int | None = None,
    hint: str = ITERATIVE_HINT,
    num_matvecs: int | None = None,
) -> Solution:
    """The failure policy: with ``throw``, raise :class:`functx.NonConvergenceError` when
    ``converged`` is False in any ``vmap`` lane. The flag is read where it can be (eager
    mode, under every functx/``torch.func`` transform); where no value can be read
    (``torch.compile``, tracing, fake tensors) nothing is raised and ``converged`` is the
    report (documented in :mod:`functx.solvers`)."""
    if not throw or all_true(solution.converged) is not False:
        return solution
    steps = int(plain(solution.num_steps).max())
    residual = float(plain(solution.residual_norm.detach()).max())
    bound = float(plain(torch.as_tensor(tol).detach()).max())
    stats = {"converged": False, "num_steps": steps, "residual_norm": residual, "tolerance": bound}
    budget = "" if max_iter is None else f" after {steps} of max_iter={max_iter} iterations"
    if max_iter is not None:
        stats["max_iter"] = max_iter
    if num_matvecs is not None:  # all products with the operator (A and A^H for normal_cg)
        stats["num_matvecs"] = num_matvecs
    report_nonconvergence(
        api,
        f"did not converge: residual norm {residual:.3g} > tolerance {bound:.3g}{budget}. {hint}",
        stats,
        throw=True,
    )
    return solution  # pragma: no cover - report_nonconvergence raised
