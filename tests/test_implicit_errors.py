"""functx.implicit: every error path, non-convergence reporting and closure capture."""

from __future__ import annotations

import functools
import re
import warnings

import pytest
import torch

import functx
from functx import solvers
from functx._solvers import _functorch
from functx.implicit import (
    NonConvergenceError,
    NonConvergenceWarning,
    custom_fixed_point,
    custom_root,
    implicit_hessian,
    implicit_jacobian,
    root_jvp,
    root_vjp,
)

D = torch.float64
P = 5


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3 * P, P, generator=g, dtype=D)
    X[:, 0] *= 30.0  # conditioning ~1e3: one Krylov iteration is never enough
    return X, torch.randn(3 * P, generator=g, dtype=D)


X, Y = _data()
LAM = torch.tensor(0.5, dtype=D)
INIT = torch.zeros(P, dtype=D)


def F(z, lam, X, y):
    return X.T @ (X @ z - y) + lam * z


def exact(init, lam, X, y):
    return torch.linalg.solve(X.T @ X + lam * torch.eye(X.shape[1], dtype=D), X.T @ y)


def loss_of(solver):
    return lambda lam: solver(INIT, lam, X, Y).pow(2).sum()


@pytest.fixture
def no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# ---------------------------------------------------------------------------------------
# Options


@pytest.mark.parametrize(
    "kwargs,exc,fragment",
    [
        (dict(solve="qr"), ValueError, "got 'qr'."),
        (dict(solve=3), TypeError, "`solve` must be one of"),
        (dict(symmetric="yes"), TypeError, "`symmetric` must be a bool"),
        (dict(on_failure="loud"), ValueError, "`on_failure` must be one of"),
        (dict(residual_tol=-1.0), ValueError, "`residual_tol` must be non-negative, got -1.0."),
        (dict(residual_tol="tight"), TypeError, "`residual_tol` must be None or a non-negative float"),
        (dict(has_aux=1), TypeError, "`has_aux` must be a bool"),
    ],
)
def test_bad_options(kwargs, exc, fragment):
    with pytest.raises(exc, match=r"`functx.implicit.custom_root`") as info:
        custom_root(F, **kwargs)
    assert fragment in str(info.value)


def test_bad_callables():
    with pytest.raises(TypeError, match="`optimality_fn` must be callable"):
        custom_root(3)
    with pytest.raises(TypeError, match=r"`functx.implicit.custom_fixed_point`: `fixed_point_fn` must be callable"):
        custom_fixed_point(None)
    with pytest.raises(TypeError, match="`solver` must be callable"):
        custom_root(F)("not a solver")


# ---------------------------------------------------------------------------------------
# Wrong structures at call time


def test_solver_returns_integers():
    solver = custom_root(lambda z, lam: z - lam)(lambda init, lam: torch.ones(2, dtype=torch.int64))
    with pytest.raises(
        TypeError, match=r"the solver's solution z must be a floating-point or complex tensor, got a torch.int64"
    ):
        solver(INIT, LAM)


def test_solver_returns_no_tensor():
    solver = custom_root(lambda z, lam: z)(lambda init, lam: None)
    with pytest.raises(ValueError, match="the solver returned no tensors"):
        solver(INIT, LAM)


def test_has_aux_solver_must_return_a_pair():
    solver = custom_root(F, has_aux=True)(exact)
    with pytest.raises(TypeError, match=r"has_aux=True the solver must return a pair \(solution, aux\)"):
        solver(INIT, LAM, X, Y)


def test_optimality_fn_structure_and_shape():
    wrong_structure = custom_root(lambda z, *a: {"z": F(z, *a)})(exact)
    with pytest.raises(
        ValueError, match="the output of `optimality_fn` must have the same tree structure as the solution z"
    ):
        wrong_structure(INIT, LAM, X, Y)
    wrong_shape = custom_root(lambda z, *a: F(z, *a)[:-1])(exact)
    with pytest.raises(
        ValueError, match=r"optimality_fn\(z, \.\.\.\) has shape \(4,\) but the corresponding leaf of the solution z"
    ):
        wrong_shape(INIT, LAM, X, Y)


def test_fixed_point_fn_structure():
    solver = custom_fixed_point(lambda z, a: (z, z))(lambda init, a: init)
    with pytest.raises(
        ValueError, match="the output of `fixed_point_fn` must have the same tree structure as the solution z"
    ):
        solver(INIT, LAM)


def test_user_solve_returns_wrong_structure():
    solver = custom_root(F, solve=lambda matvec, b: (b, b))(exact)
    with pytest.raises(
        ValueError,
        match=r"the linear `solve`'s result \(a pytree, or a `functx.solvers.Solution`\) must have the same tree structure",
    ):
        functx.grad(loss_of(solver))(LAM)
    solver = custom_root(F, solve=lambda matvec, b: 0.0)(exact)
    with pytest.raises(TypeError, match=r"solve\(matvec, b\) must be a tensor, got a value of type float"):
        functx.grad(loss_of(solver))(LAM)


# ---------------------------------------------------------------------------------------
# Non-convergence: forward residual


def _sloppy(init, lam, X, y):  # a few gradient steps: not a root
    z = init
    for _ in range(3):
        z = z - 1e-4 * F(z, lam, X, y)
    return z


def test_forward_residual_warns_by_default():
    with pytest.warns(
        NonConvergenceWarning, match=r"the solver's output is not a root: \|\|optimality_fn\(z, \.\.\.\)\|\|"
    ):
        custom_root(F)(_sloppy)(INIT, LAM, X, Y)


def test_forward_residual_raise_and_ignore(no_warnings):
    with pytest.raises(NonConvergenceError, match="not a root"):
        custom_root(F, throw=True)(_sloppy)(INIT, LAM, X, Y)
    with pytest.warns(FutureWarning, match=r"`on_failure` is deprecated.*'ignore' is throw=False"):
        ignoring = custom_root(F, on_failure="ignore")
    ignoring(_sloppy)(INIT, LAM, X, Y)
    custom_root(F, residual_tol=1e6)(_sloppy)(INIT, LAM, X, Y)  # a loose tolerance accepts it


def test_forward_residual_reported_under_vmap_for_any_lane():
    def half_converged(init, lam, X, y):
        z = exact(init, lam, X, y)
        return torch.where(lam > 1, z + 1.0, z)  # lanes with lam > 1 are wrong

    solver = custom_root(F, throw=True)(half_converged)
    ok = functx.vmap(lambda lam: solver(INIT, lam, X, Y))(torch.tensor([0.2, 0.5], dtype=D))
    assert ok.shape == (2, P)
    with pytest.raises(NonConvergenceError, match="not a root"):
        functx.vmap(lambda lam: solver(INIT, lam, X, Y))(torch.tensor([0.2, 2.0], dtype=D))


# ---------------------------------------------------------------------------------------
# Non-convergence: backward (adjoint) and tangent linear solves

ONE_STEP = functools.partial(solvers.gmres, max_iter=1)


def test_adjoint_solve_failure_warns():
    L = loss_of(custom_root(F, solve=ONE_STEP)(exact))
    L(LAM)  # the forward pass is fine
    with pytest.warns(NonConvergenceWarning, match=r"the adjoint linear solve \(solve=gmres\) did not converge"):
        functx.grad(L)(LAM)


def test_tangent_solve_failure_raises():
    L = loss_of(custom_root(F, solve=ONE_STEP, throw=True)(exact))
    with pytest.raises(NonConvergenceError, match="the tangent linear solve"):
        functx.jacfwd(L)(LAM)
    with pytest.raises(NonConvergenceError, match="the adjoint linear solve"):
        functx.vmap(functx.grad(L))(torch.tensor([0.5, 1.0], dtype=D))


def test_second_order_solve_failure_raises():
    """The solves inside the derivative rules' own derivatives are checked too."""
    calls = []

    def flaky(matvec, b):  # exact for the first solve, then a single GMRES step
        calls.append(1)
        return solvers.lu(matvec, b) if len(calls) == 1 else ONE_STEP(matvec, b)

    L = loss_of(custom_root(F, solve=flaky, throw=True)(exact))
    with pytest.raises(NonConvergenceError, match="linear solve"):
        functx.hessian(L)(LAM)


def test_user_solve_without_report_is_checked():
    solver = custom_root(F, solve=lambda matvec, b: b)(exact)  # "solves" A x = b with x = b
    with pytest.warns(NonConvergenceWarning, match=r"solve=<lambda>\) did not converge \(residual norm"):
        functx.grad(loss_of(solver))(LAM)


def test_ignore_silences_the_linear_solves(no_warnings):
    with pytest.warns(FutureWarning, match="`on_failure` is deprecated"):
        L = loss_of(custom_root(F, solve=ONE_STEP, on_failure="ignore")(exact))
    functx.grad(L)(LAM)


def test_on_failure_is_a_deprecated_spelling_of_throw():
    """on_failure (one release): 'raise' -> throw=True, 'warn' -> throw=False; the same
    functx.NonConvergenceError class, with its statistics."""
    assert NonConvergenceError is functx.NonConvergenceError and NonConvergenceWarning is functx.NonConvergenceWarning
    with pytest.warns(FutureWarning, match=r"on_failure='raise' is throw=True"):
        raising = custom_root(F, on_failure="raise")
    with pytest.raises(functx.NonConvergenceError, match="not a root") as info:
        raising(_sloppy)(INIT, LAM, X, Y)
    assert info.value.api == "functx.implicit.custom_root" and info.value.stats["residual_norm"] > 0
    with pytest.warns(FutureWarning, match=r"on_failure='warn' is throw=False"):
        warning = custom_root(F, on_failure="warn")
    with pytest.warns(NonConvergenceWarning, match=r"not a root.*\(pass throw=True to raise\)"):
        warning(_sloppy)(INIT, LAM, X, Y)
    with pytest.raises(ValueError, match=r"`on_failure` must be None or 'raise' with throw=True"):
        with pytest.warns(FutureWarning):
            custom_root(F, throw=True, on_failure="ignore")
    with pytest.raises(TypeError, match=r"`functx.implicit.custom_root`: `throw` must be a bool, got 'yes'"):
        custom_root(F, throw="yes")


# ---------------------------------------------------------------------------------------
# Closure capture


def test_capture_of_a_tensor_requiring_grad_raises():
    lam = LAM.clone().requires_grad_()
    solver = custom_root(lambda z, X, y: F(z, lam, X, y))(lambda init, X, y: exact(init, lam.detach(), X, y))
    with pytest.raises(ValueError, match=r"uses a torch.float64 tensor of shape \(\) with requires_grad=True"):
        solver(INIT, X, Y)
    assert lam.requires_grad and lam.grad is None


@pytest.mark.parametrize("transform", ["grad", "jacfwd", "torch.func.grad", "jacrev(jacfwd)"])
def test_capture_of_a_traced_tensor_raises(transform):
    def outer(lam):
        solver = custom_root(lambda z, X, y: F(z, lam, X, y))(lambda init, X, y: exact(init, lam, X, y))
        return solver(INIT, X, Y).sum()

    fn = {
        "grad": functx.grad(outer),
        "jacfwd": functx.jacfwd(outer),
        "torch.func.grad": torch.func.grad(outer),
        "jacrev(jacfwd)": functx.jacrev(functx.jacfwd(outer)),
    }[transform]
    # a top-level functx.grad runs plain autograd, where the capture is a tensor requiring grad
    with pytest.raises(ValueError, match=r"traced by an enclosing grad/jvp transform|requires_grad=True"):
        fn(LAM)


def test_capture_inside_a_transform_of_the_optimality_fn_raises():
    """F = grad of an inner loss closing over lam: F's own grad level reuses the number of
    the caller's level, which the check must not confuse."""

    def outer(lam):
        inner = lambda z: 0.5 * (X @ z - Y).pow(2).sum() + 0.5 * lam * z.pow(2).sum()
        solver = custom_root(lambda z, dummy: functx.grad(inner)(z), symmetric=True)(
            lambda init, dummy: exact(init, lam, X, Y)
        )
        return solver(INIT, LAM).sum()

    # torch.func.grad always runs functorch levels (a top-level functx.grad runs plain autograd)
    with pytest.raises(ValueError, match="traced by an enclosing grad/jvp transform"):
        torch.func.grad(outer)(LAM)


def test_detached_capture_is_a_constant(no_warnings):
    lam = LAM.clone().requires_grad_()
    solver = custom_root(lambda z, X, y: F(z, lam.detach(), X, y))(lambda init, X, y: exact(init, lam.detach(), X, y))
    torch.testing.assert_close(solver(INIT, X, Y), exact(INIT, LAM, X, Y))


# ---------------------------------------------------------------------------------------
# Forward over forward


def test_forward_over_forward_self_check_passes_on_this_torch():
    assert _functorch.forward_over_forward_ok()


def test_forward_over_forward_refused_when_the_fix_fails(monkeypatch):
    monkeypatch.setattr(_functorch, "forward_over_forward_ok", lambda: False)
    L = loss_of(custom_root(F, symmetric=True)(exact))
    with pytest.raises(NotImplementedError, match=r"forward-over-forward .* mode='fwd-rev'"):
        functx.jacfwd(functx.jacfwd(L))(LAM)
    with pytest.raises(NotImplementedError, match="pytorch/pytorch#197867"):
        functx.jvp(lambda l: functx.jvp(L, (l,), (LAM,))[1], (LAM,), (LAM,))
    reference = functx.hessian(L, mode="rev-rev")(LAM)  # one forward level is fine
    torch.testing.assert_close(functx.hessian(L, mode="fwd-rev")(LAM), reference)
    torch.testing.assert_close(functx.jacrev(functx.jacfwd(L))(LAM), reference)


def test_plain_forward_ad_dual_numbers_are_refused():
    import torch.autograd.forward_ad as fwAD

    solver = custom_root(F, symmetric=True)(exact)
    with fwAD.dual_level():
        solver(INIT, LAM, X, Y)  # no dual input: fine
        with pytest.raises(NotImplementedError, match=r"torch.autograd.forward_ad dual numbers are not supported"):
            solver(INIT, fwAD.make_dual(LAM, torch.ones_like(LAM)), X, Y)


# ---------------------------------------------------------------------------------------
# Sensitivity API and primitives


def _root_at(lam):
    return exact(INIT, lam, X, Y)


def k_fn(z, lam):
    return F(z, lam, X, Y)


@pytest.mark.parametrize(
    "call,exc,fragment",
    [
        (lambda: implicit_jacobian(3, _root_at(LAM), LAM), TypeError, "`k_fn` must be callable"),
        (lambda: implicit_jacobian(k_fn, _root_at(LAM)), TypeError, "pass at least one parameter"),
        (
            lambda: implicit_jacobian(k_fn, _root_at(LAM), {}),
            ValueError,
            "`params[0]` must contain at least one tensor",
        ),
        (lambda: implicit_hessian(k_fn, _root_at(LAM), LAM, jvp_vec=LAM), ValueError, "`Hg` and `jvp_vec` need `Dg`"),
        (
            lambda: implicit_jacobian(k_fn, _root_at(LAM), torch.tensor(1)),
            TypeError,
            "params[0] must be a floating-point or complex tensor",
        ),
        (
            lambda: implicit_jacobian(k_fn, _root_at(LAM).long(), LAM),
            TypeError,
            "z must be a floating-point or complex tensor",
        ),
        (lambda: implicit_jacobian(k_fn, _root_at(LAM), LAM, Dg=INIT, jvp_vec=LAM), ValueError, "at most one of `Dg`"),
        (
            lambda: implicit_jacobian(k_fn, _root_at(LAM), LAM, Dg=INIT[:2]),
            ValueError,
            "Dg has shape (2,) but the corresponding leaf of `z` has shape (5,)",
        ),
        (
            lambda: implicit_jacobian(k_fn, _root_at(LAM), LAM, Dg={"z": INIT}),
            ValueError,
            "`Dg` must have the same tree structure as `z`",
        ),
        (
            lambda: implicit_jacobian(k_fn, _root_at(LAM), LAM, jvp_vec=(LAM, LAM)),
            ValueError,
            "one tangent per parameter (1)",
        ),
        (
            lambda: implicit_hessian(k_fn, _root_at(LAM), LAM, Hg=torch.eye(P)),
            ValueError,
            "`Hg` and `jvp_vec` need `Dg`",
        ),
        (
            lambda: implicit_hessian(k_fn, _root_at(LAM), LAM, Dg=INIT, Hg=torch.eye(3)),
            ValueError,
            "`Hg` must be a callable",
        ),
        (lambda: root_vjp(k_fn, _root_at(LAM), LAM, INIT), TypeError, "`args` must be a tuple"),
        (
            lambda: root_vjp(k_fn, _root_at(LAM), (LAM,), INIT[:3]),
            ValueError,
            "cotangent has shape (3,) but the corresponding leaf of the solution",
        ),
        (
            lambda: root_jvp(k_fn, _root_at(LAM), (LAM,), LAM),
            TypeError,
            "`tangents` must be a tuple with one entry per entry of `args`",
        ),
        (
            lambda: root_jvp(k_fn, _root_at(LAM), (LAM,), ((LAM,),)),
            ValueError,
            "`tangents[0]` must have the same tree structure as the argument",
        ),
        (
            lambda: root_jvp(k_fn, _root_at(LAM), (LAM,), (INIT,)),
            ValueError,
            "tangents[0] has shape (5,) but the corresponding leaf of the argument",
        ),
    ],
)
def test_sensitivity_and_primitive_errors(call, exc, fragment):
    with pytest.raises(exc, match=re.escape(fragment)) as info:
        call()
    assert str(info.value).startswith("`functx.implicit.")


def test_sensitivity_checks_the_solution():
    with pytest.warns(NonConvergenceWarning, match=r"\|\|k_fn\(z, \.\.\.\)\|\|"):
        implicit_jacobian(k_fn, INIT, LAM)
    with pytest.raises(NonConvergenceError, match=r"is not a root"):
        root_vjp(k_fn, INIT, (LAM,), INIT, throw=True)


def test_linear_solves_never_write_the_callers_cotangent():
    """A user `solve` (or a built-in one's matvec) gets copies, never the cotangent or tangent
    the caller passed (issue 15, defect 6, for the implicit room)."""
    A = X.T @ X + LAM * torch.eye(P, dtype=D)

    def clobbering(matvec, b):  # a careless user solve: uses b as scratch space
        x = torch.linalg.solve(A, b)
        b.zero_()
        return x

    z = exact(INIT, LAM, X, Y)
    cotangent = torch.linspace(1.0, 2.0, P, dtype=D)
    before = cotangent.clone()
    for solve in (clobbering, "cg", "gmres", "lu"):
        (got,) = root_vjp(F, z, (LAM, X, Y), cotangent, solve=solve)[:1]
        assert torch.equal(cotangent, before), solve
        want = -(torch.linalg.solve(A, cotangent) @ z)  # d/dlam of F is z: lam_bar = -u.z
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
