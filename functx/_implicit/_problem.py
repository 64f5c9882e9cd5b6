"""The implicit function theorem as an ``autograd.Function``: ``z*(theta)`` with ``F(z*, theta) = 0``.

By the implicit function theorem, with ``A = dF/dz`` and ``B = dF/dtheta`` at ``(z*, theta)``,

* forward mode: ``z_dot = -A^{-1} (B theta_dot)`` (one solve with ``A``);
* reverse mode: ``theta_bar = -B^T A^{-T} z_bar`` (one solve with ``A^T``).

:class:`Root` is the ``autograd.Function`` that runs the user's solver (never under
autograd) and attaches these rules. The solves are :class:`~functx._solvers.linear_solve.LinearSolve` calls
whose own rules are solves too, and ``z*`` is saved as an *output* of :class:`Root`, so the
rules stay differentiable through the dependence of ``z*`` on ``theta``: every order of
every transform is exact.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .._core import is_differentiable
from .._solvers._functorch import eager_under_compile, forward_rule, plain, revive
from .._solvers.linear_solve import Operator, Tensors, check_solve, check_throw, norm, report, solve
from .._tree import (
    PyTree,
    TreeSpec,
    check_float_leaves,
    describe,
    flatten_like,
    leaf_paths,
    tree_flatten,
    tree_unflatten,
    tree_vdot,
)
from .._validate import check_tolerance
from ._capture import CaptureCheck, check_no_plain_duals


@dataclasses.dataclass(frozen=True)
class Options:
    """The validated options of one implicit function (shared by all its calls)."""

    api: str
    fn_name: str  # how the optimality function is named in errors
    solve: Any
    symmetric: bool
    throw: bool
    warn: bool  # with throw=False: warn (only the deprecated on_failure="ignore" silences it)
    residual_tol: float | None
    # set once a declared symmetric Jacobian has passed (or warned about) the symmetry check
    symmetry_checked: list[bool] = dataclasses.field(default_factory=list, compare=False, hash=False)

    @classmethod
    def make(
        cls,
        api: str,
        fn_name: str,
        solve: Any,
        symmetric: Any,
        throw: Any,
        on_failure: Any,
        residual_tol: Any,
    ) -> Options:
        solve, symmetric = check_solve(solve, symmetric, api)
        if residual_tol is not None:
            residual_tol = check_tolerance(residual_tol, "residual_tol", api, 0.0)
        throw, warn = check_throw(throw, on_failure, api)
        return cls(api, fn_name, solve, symmetric, throw, warn, residual_tol)

    def report(self, ok: torch.Tensor, message: Callable[[], str], stats: Callable[[], dict[str, Any]]) -> None:
        """The failure policy for the checks of this implicit function (see :func:`report`)."""
        report(ok, self.throw, self.warn, self.api, message, stats)


class RootProblem:
    """One call of an implicit function: flattened arguments, and ``F`` on flat leaves.

    The positional and keyword arguments are flattened together. Floating-point and
    complex tensor leaves (``diff``) are differentiated; other tensor leaves (``static``)
    are passed through the Function boundary without derivatives (so ``vmap`` sees them);
    non-tensor leaves are kept here. ``z``'s structure is recorded by the forward pass.
    """

    def __init__(
        self,
        options: Options,
        optimality_fn: Callable[..., Any],
        solver: Callable[..., Any] | None,
        has_aux: bool,
        init: PyTree,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.options, self.optimality_fn, self.solver, self.has_aux = options, optimality_fn, solver, has_aux
        # an empty dict is left out: torch.compile cannot trace optree over one
        self.arg_leaves, self.arg_spec = tree_flatten((tuple(args), dict(kwargs)) if kwargs else (tuple(args),))
        self.diff_pos = [k for k, leaf in enumerate(self.arg_leaves) if is_differentiable(leaf)]
        self.static_pos = [
            k
            for k, leaf in enumerate(self.arg_leaves)
            if isinstance(leaf, torch.Tensor) and not is_differentiable(leaf)
        ]
        self.init_leaves, self.init_spec = tree_flatten(init)
        self.init_pos = [k for k, leaf in enumerate(self.init_leaves) if isinstance(leaf, torch.Tensor)]
        self.z_spec: TreeSpec  # set by the forward pass (run_solver) or by root_vjp/root_jvp
        self.aux_spec: TreeSpec  # set by the forward pass when has_aux
        self.aux_static: list[Any] = []

    # -- the flat boundary ----------------------------------------------------------------
    def inputs(self) -> list[torch.Tensor]:
        """The tensors handed to :class:`Root`: ``diff + static + init``."""
        leaves = self.arg_leaves
        return [leaves[k] for k in self.diff_pos + self.static_pos] + [self.init_leaves[k] for k in self.init_pos]

    def check_signature(self) -> None:
        """``F`` must accept ``(z, *args, **kwargs)``: refused before the solver runs."""
        args, kwargs = self.args_from((), ())  # the arguments as given
        error = signature_error(self.optimality_fn, 1 + len(args), tuple(sorted(kwargs)))
        if error is not None:
            o = self.options
            raise TypeError(
                f"`functx.{o.api}`: `{o.fn_name}` must accept `(z, *args, **kwargs)` with the "
                f"decorated function's arguments after z ({len(args)} positional"
                f"{', keywords ' + str(sorted(kwargs)) if kwargs else ''}), but {error}."
            )

    @property
    def n_diff(self) -> int:
        return len(self.diff_pos)

    @property
    def n_args(self) -> int:
        return len(self.diff_pos) + len(self.static_pos)

    @property
    def nz(self) -> int:
        return self.z_spec.num_leaves

    def args_from(
        self, diff: Sequence[torch.Tensor], static: Sequence[torch.Tensor]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        leaves = list(self.arg_leaves)
        for k, t in zip(self.diff_pos + self.static_pos, list(diff) + list(static)):
            leaves[k] = t
        args_kwargs = tree_unflatten(self.arg_spec, leaves)
        return args_kwargs[0], (args_kwargs[1] if len(args_kwargs) > 1 else {})

    def init_from(self, tensors: Sequence[torch.Tensor]) -> PyTree:
        leaves = list(self.init_leaves)
        for k, t in zip(self.init_pos, tensors):
            leaves[k] = t
        return tree_unflatten(self.init_spec, leaves)

    def F(self, z: Sequence[torch.Tensor], diff: Sequence[torch.Tensor], static: Sequence[torch.Tensor]) -> Tensors:
        """The optimality function on flat leaves."""
        args, kwargs = self.args_from(diff, static)
        out = self.optimality_fn(tree_unflatten(self.z_spec, list(z)), *args, **kwargs)
        o = self.options
        what = f"the output of `{o.fn_name}`"
        return tuple(
            flatten_like(
                out,
                self.z_spec,
                z,
                name="output",
                root=f"{o.fn_name}(z, ...)",
                api=o.api,
                ref="the solution z",
                what=what,
            )
        )

    # -- the linear operator dF/dz ----------------------------------------------------------
    def split(self, ops: Sequence[torch.Tensor]) -> tuple[Tensors, Tensors, Tensors]:
        nz, nd = self.nz, self.n_diff
        return tuple(ops[:nz]), tuple(ops[nz : nz + nd]), tuple(ops[nz + nd :])

    def _make_jvp_matvec(self, ops: Tensors) -> Callable[[Tensors], Tensors]:
        z, d, s = self.split(ops)
        f = lambda *zz: self.F(zz, d, s)
        return lambda v: torch.func.jvp(f, z, tuple(v))[1]

    def _make_vjp_matvec(self, ops: Tensors) -> Callable[[Tensors], Tensors]:
        z, d, s = self.split(ops)
        pullback = torch.func.vjp(lambda *zz: self.F(zz, d, s), *z)[1]
        return lambda u: pullback(tuple(u))

    def operator(self, transposed: bool) -> Operator:
        """``A = dF/dz`` (or ``A^T``) with operands ``(z, diff, static)``.

        ``A^T u`` is a VJP of ``F``; ``A v`` is a JVP, or the same VJP when the Jacobian is
        declared symmetric (then only reverse mode is ever needed for ``F``).
        """
        o = self.options
        matvec = self._make_vjp_matvec if o.symmetric else self._make_jvp_matvec
        rmatvec = self._make_vjp_matvec
        if transposed:
            matvec, rmatvec = rmatvec, matvec
        return Operator(
            make_matvec=matvec,
            make_rmatvec=rmatvec,
            spec=self.z_spec,
            n_diff=self.nz + self.n_diff,
            solve=o.solve,
            throw=o.throw,
            warn=o.warn,
            api=o.api,
            role="adjoint" if transposed else "tangent",
        )

    # -- the implicit function theorem ------------------------------------------------------
    def vjp(self, z: Tensors, d: Tensors, s: Tensors, z_bar: Sequence[torch.Tensor]) -> Tensors:
        """``theta_bar = -B^T A^{-T} z_bar`` for the differentiable arguments."""
        if not d:
            return ()
        self.check_symmetric(z, d, s)
        lam = solve(self.operator(transposed=True), z + d + s, z_bar)
        pullback = torch.func.vjp(lambda *dd: self.F(z, dd, s), *d)[1]
        return tuple(-g for g in pullback(tuple(lam)))

    def jvp(self, z: Tensors, d: Tensors, s: Tensors, d_dot: Sequence[torch.Tensor | None]) -> Tensors:
        """``z_dot = -A^{-1} B theta_dot``."""
        if all(t is None for t in d_dot):
            return tuple(torch.zeros_like(zi) for zi in z)
        self.check_symmetric(z, d, s)
        d_dot = tuple(torch.zeros_like(di) if t is None else t for di, t in zip(d, d_dot))
        moved = torch.func.jvp(lambda *dd: self.F(z, dd, s), d, d_dot)[1]
        return solve(self.operator(transposed=False), z + d + s, tuple(-m for m in moved))

    # -- the forward pass -----------------------------------------------------------------
    def run_solver(self, tensors: Sequence[torch.Tensor]) -> Tensors:
        """Run the solver on detached inputs, check the solution, return ``z + aux`` leaves."""
        tensors = [t.detach() for t in tensors]
        d, s = tensors[: self.n_diff], tensors[self.n_diff : self.n_args]
        args, kwargs = self.args_from(d, s)
        assert self.solver is not None  # only root_vjp/root_jvp build a problem without a solver
        with torch.enable_grad():  # solvers may use autograd internally, on their own tensors
            out = self.solver(self.init_from(tensors[self.n_args :]), *args, **kwargs)
        z, aux = self._split_aux(out)
        z_leaves, self.z_spec = tree_flatten(z)
        self.check_z(z, z_leaves)
        z_leaves = [leaf.detach().clone() for leaf in z_leaves]
        self.check_solution(tuple(z_leaves), tuple(d), tuple(s))
        aux_leaves, self.aux_spec = tree_flatten(aux)
        self.aux_static = [None if isinstance(a, torch.Tensor) else a for a in aux_leaves]
        aux_tensors = [a.detach().clone() for a in aux_leaves if isinstance(a, torch.Tensor)]
        return tuple(z_leaves + aux_tensors)

    def _split_aux(self, out: Any) -> tuple[PyTree, PyTree]:
        if not self.has_aux:
            return out, None
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError(
                f"`functx.{self.options.api}`: with has_aux=True the solver must return a pair "
                f"(solution, aux), got {describe(out)}."
            )
        return out[0], out[1]

    def check_z(self, z: PyTree, leaves: list[Any]) -> None:
        api = self.options.api
        if not leaves:
            raise ValueError(f"`functx.{api}`: the solver returned no tensors (got {z!r}).")
        hint = "" if self.has_aux else "To return auxiliary values too, pass has_aux=True."
        check_float_leaves(leaves, lambda: leaf_paths(z, "z"), api=api, what="the solver's solution ", hint=hint)

    def check_solution(self, z: Tensors, d: Tensors, s: Tensors) -> None:
        """Evaluate ``F(z, theta)`` once: structure, closure capture, and the residual."""
        api, name = self.options.api, self.options.fn_name
        with torch.enable_grad(), CaptureCheck([*z, *d, *s]) as capture:
            out = self.F(z, d, s)
        if capture.offenders:
            raise ValueError(
                f"`functx.{api}`: `{name}` uses {capture.offenders[0]} that is not one of its "
                f"arguments (captured by closure or a global). Implicit derivatives flow only to the "
                f"arguments of the decorated function, so its derivatives would be silently dropped. "
                f"Pass it as an argument (to both the solver and `{name}`), or `.detach()` it if it is "
                f"a constant."
            )
        residual = norm(out)
        given = self.options.residual_tol
        tol = math.sqrt(torch.finfo(z[0].dtype).eps) * (1 + norm(z)) if given is None else given
        self.options.report(
            residual <= tol,
            lambda: self._residual_message(residual, tol),
            lambda: {"converged": False, "residual_norm": float(plain(residual).max())},
        )

    def check_symmetric(self, z: Tensors, d: Tensors, s: Tensors) -> None:
        """A declared symmetric ``A = dF/dz`` must be: ``u.(A v) = v.(A u)`` for two fixed
        pseudo-random ``u, v``, to ``sqrt(eps)`` relative. Symmetry is a property of ``F``'s
        form, so it is checked once per implicit function (per ``root_vjp``/``root_jvp``/
        ``implicit_*`` call), when the first derivative rule runs: values never pay, and
        later calls pay nothing.

        Without this, a nonsymmetric ``A`` with a direct solve (``"lu"``) silently gives the
        transposed derivatives (``A v`` is computed as ``A^T v``).
        """
        if not self.options.symmetric or self.options.symmetry_checked or any(zi.is_complex() for zi in z):
            return
        u, v = probe(z, 0.7548776662), probe(z, 0.5698402910)
        with torch.enable_grad():
            pullback = torch.func.vjp(lambda *zz: self.F(zz, d, s), *z)[1]
        Au, Av = pullback(u), pullback(v)  # A^T u and A^T v: the same check
        detached = lambda t: [x.detach() for x in t]
        uAv, vAu = tree_vdot(detached(u), detached(Av)), tree_vdot(detached(v), detached(Au))
        tol = math.sqrt(torch.finfo(z[0].dtype).eps) * (norm(Au) * norm(v) + norm(Av) * norm(u))
        asym = (uAv - vAu).abs()
        self.options.report(
            asym <= tol,
            lambda: self._symmetry_message(asym, tol),
            lambda: {"symmetric": False, "asymmetry": float(plain(asym).max())},
        )
        self.options.symmetry_checked.append(True)  # not reached when throw=True fails

    def _symmetry_message(self, asym: torch.Tensor, tol: torch.Tensor) -> str:
        o = self.options
        return (
            f"the Jacobian of `{o.fn_name}` with respect to z was declared symmetric "
            f"(symmetric=True, or solve={o.solve!r}) but is not: |u.(A v) - v.(A u)| = "
            f"{float(plain(asym).max()):.3g} > {float(plain(tol).max()):.3g} for random u, v, so the "
            f"implicit derivatives would be those of the transposed system. Pass symmetric=False with "
            f"solve='gmres', 'bicgstab' or 'lu'."
        )

    def _residual_message(self, residual: torch.Tensor, tol: Any) -> str:
        worst = float(plain(residual).max())
        return (
            f"the solver's output is not a root: ||{self.options.fn_name}(z, ...)|| "
            f"= {worst:.3g} > residual_tol = {float(plain(torch.as_tensor(tol)).max()):.3g}. Implicit "
            f"derivatives assume an exact solution and are only as accurate as the residual; run "
            f"the solver longer or with a tighter tolerance, or set `residual_tol` (default: "
            f"sqrt(eps) * (1 + ||z||))."
        )

    # -- rebuilding outputs --------------------------------------------------------------
    def outputs(self, flat: Sequence[torch.Tensor]) -> Any:
        z = tree_unflatten(self.z_spec, list(flat[: self.nz]))
        if not self.has_aux:
            return z
        tensors = iter(flat[self.nz :])
        aux = tree_unflatten(self.aux_spec, [next(tensors) if a is None else a for a in self.aux_static])
        return z, aux


@functools.lru_cache(maxsize=256)
def signature_error(fn: Callable[..., Any], n_positional: int, keywords: tuple[str, ...]) -> str | None:
    """Why ``fn`` cannot be called with ``n_positional`` positional arguments and ``keywords``
    (``None`` when it can, or when its signature cannot be read)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(*range(n_positional), **dict.fromkeys(keywords))
    except TypeError as e:
        return f"its signature {signature} does not: {e}"
    return None


def probe(like: Sequence[torch.Tensor], step: float) -> Tensors:
    """Deterministic pseudo-random vectors shaped like ``like`` (no RNG: usable under
    ``vmap`` and reproducible), entries in ``[-1, 1]``."""
    out, offset = [], 0
    for t in like:
        k = torch.arange(offset, offset + t.numel(), dtype=t.dtype, device=t.device)
        out.append(torch.sin(k * step * 1000.0 + step).reshape(t.shape))
        offset += t.numel()
    return tuple(out)


class Root(torch.autograd.Function):
    """``z* = solver(init, *args)`` with implicit derivative rules; inputs ``(problem, *problem.inputs())`` with ``problem`` a :class:`RootProblem`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(problem: RootProblem, *tensors: torch.Tensor) -> Tensors:
        return problem.run_solver(tensors)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensors) -> None:
        problem = ctx.problem = inputs[0]
        z, args = output[: problem.nz], inputs[1 : 1 + problem.n_args]
        ctx.save_for_backward(*z, *args)
        ctx.save_for_forward(*z, *args)
        if len(output) > problem.nz:
            ctx.mark_non_differentiable(*output[problem.nz :])

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        problem = ctx.problem
        z, d, s = problem.split(revive(ctx.saved_tensors))
        d_bar = problem.vjp(z, d, s, revive(grads[: problem.nz]))
        return (None, *d_bar, *([None] * (len(s) + len(problem.init_pos))))

    @staticmethod
    def jvp(ctx: Any, *tangents: torch.Tensor | None) -> tuple[Any, ...]:
        problem = ctx.problem
        with forward_rule(ctx.saved_tensors, problem.options.api) as saved:
            z, d, s = problem.split(saved)
            z_dot = problem.jvp(z, d, s, tangents[1 : 1 + problem.n_diff])
        return (*z_dot, *[None] * sum(a is None for a in problem.aux_static))


@eager_under_compile
def call_root(problem: RootProblem) -> Any:
    problem.check_signature()
    inputs = problem.inputs()
    check_no_plain_duals(inputs, problem.options.api)
    return problem.outputs(Root.apply(problem, *inputs))
