"""Regression tests for silent wrong answers and leaked torch errors in functx.implicit and
functx.solvers (issue 10): declared symmetry is checked, fixed-point maps of the wrong shape
are refused, vmapped solvers stop when every lane has converged, bad callables get clear
errors, and torch.compile runs implicit functions eagerly at a graph break (refused under
fullgraph=True) instead of dropping their derivatives."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import functx
from functx import solvers
from functx.implicit import NonConvergenceError, NonConvergenceWarning, custom_fixed_point, custom_root, root_vjp

F64 = torch.float64
M = torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=F64)  # nonsymmetric
A = torch.tensor([1.0, 2.0], dtype=F64)


def _linear_root(**options):
    @custom_root(lambda z, a: M @ z - a, **options)
    def solver(init, a):
        return torch.linalg.solve(M, a)

    return lambda a: solver(torch.zeros(2, dtype=F64), a)


# ---------------------------------------------------------------------------------------
# Declared symmetry is checked


def test_nonsymmetric_jacobian_declared_symmetric_warns_with_lu():
    f = _linear_root(symmetric=True, solve="lu")
    with pytest.warns(NonConvergenceWarning, match=r"declared symmetric .* but is not"):
        functx.jacrev(f)(A)  # would silently be the transpose of the true Jacobian


def test_nonsymmetric_jacobian_declared_symmetric_raises_on_request():
    f = _linear_root(symmetric=True, solve="lu", throw=True)
    torch.testing.assert_close(f(A), torch.linalg.solve(M, A))  # the value needs no symmetry
    with pytest.raises(NonConvergenceError, match=r"declared symmetric"):
        functx.jacrev(f)(A)


def test_undeclared_nonsymmetric_jacobian_is_exact():
    f = _linear_root(solve="lu")
    torch.testing.assert_close(functx.jacfwd(f)(A), torch.linalg.inv(M), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(functx.jacrev(f)(A), torch.linalg.inv(M), rtol=1e-12, atol=1e-12)


def test_symmetric_jacobian_passes_the_check():
    S = M + M.T + 4 * torch.eye(2, dtype=F64)  # SPD: the gradient of z.Sz/2 - a.z
    for solve in ("lu", "cg", "cholesky"):

        @custom_root(lambda z, a: S @ z - a, symmetric=True, solve=solve, throw=True)
        def solver(init, a):
            return torch.linalg.solve(S, a)

        jac = functx.jacrev(lambda a: solver(torch.zeros(2, dtype=F64), a))(A)  # no warning, no error
        torch.testing.assert_close(jac, torch.linalg.inv(S), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------
# Fixed-point maps of the wrong shape


@pytest.mark.parametrize(
    "T, exc, got",
    [
        (
            lambda z, a: (z * a).sum(),
            ValueError,
            "has shape () but the corresponding leaf of the solution z has shape (2,)",
        ),
        (lambda z, a: torch.cat([z, a]), ValueError, "has shape (4,) but the corresponding leaf of the solution z"),
        (
            lambda z, a: (z * a).float(),
            TypeError,
            "has dtype torch.float32 but the corresponding leaf of the solution z",
        ),
    ],
)
def test_fixed_point_map_of_the_wrong_shape_is_refused(T, exc, got):
    solver = custom_fixed_point(T)(lambda init, a: init)
    with pytest.raises(
        exc, match=r"`functx.implicit.custom_fixed_point`: fixed_point_fn\(z, \.\.\.\) " + re.escape(got)
    ):
        solver(torch.zeros(2, dtype=F64), A)


# ---------------------------------------------------------------------------------------
# Clear errors


def test_optimality_fn_of_the_wrong_signature():
    solver = custom_root(lambda z: z)(lambda init, a: a)
    with pytest.raises(TypeError, match=r"`optimality_fn` must accept `\(z, \*args, \*\*kwargs\)`.*1 positional"):
        solver(torch.zeros(2, dtype=F64), A)
    with pytest.raises(TypeError, match=r"`functx.implicit.root_vjp`: `optimality_fn` must accept"):
        root_vjp(lambda z, a, b: z - a, A, (A,), A)
    keywords = custom_root(lambda z, a: z - a)(lambda init, a, *, scale: a)
    with pytest.raises(TypeError, match=r"keywords \['scale'\]"):
        keywords(torch.zeros(2, dtype=F64), A, scale=2.0)


@pytest.mark.parametrize(
    "solve, exc, fragment",
    [
        (
            lambda matvec, b: b[:1],
            ValueError,
            r"has shape \(1,\) but the corresponding leaf of its right-hand side `b`",
        ),
        (lambda matvec, b: b.float(), TypeError, r"has dtype torch.float32 but the corresponding leaf of its right"),
    ],
)
def test_custom_solve_returning_the_wrong_shape(solve, exc, fragment):
    solver = custom_root(lambda z, a: z - a, solve=solve)(lambda init, a: a)
    with pytest.raises(exc, match=rf"`functx.implicit.custom_root`: solve\(matvec, b\) {fragment}"):
        functx.grad(lambda a: solver(torch.zeros(2, dtype=F64), a).sum())(A)


def test_normal_cg_rectangular_without_x0():
    X = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]], dtype=F64)
    y = torch.tensor([1.0, 2.0, 4.0], dtype=F64)
    with pytest.raises(ValueError, match=r"`functx.solvers.normal_cg`: `matvec` failed .* pass `x0`"):
        solvers.normal_cg(lambda w: X @ w, y)
    sol = solvers.normal_cg(lambda w: X @ w, y, x0=torch.zeros(2, dtype=F64))
    torch.testing.assert_close(sol.value, torch.linalg.lstsq(X, y).solution, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------
# vmapped solvers stop once every lane has converged


def _counted(a):
    calls = []

    def matvec(x):
        calls.append(1)
        return a @ x

    return matvec, calls


@pytest.mark.parametrize("name", ["cg", "minres", "gmres", "bicgstab"])
def test_vmapped_solver_stops_when_every_lane_has_converged(name):
    q = torch.linalg.qr(torch.arange(25, dtype=F64).reshape(5, 5).cos())[0]
    a = q @ torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=F64)) @ q.T  # SPD
    bs = torch.eye(5, dtype=F64)[:3] + 0.5
    matvec, calls = _counted(a)
    sol = functx.vmap(lambda b: getattr(solvers, name)(matvec, b, max_iter=200_000))(bs)
    torch.testing.assert_close(sol.value, torch.linalg.solve(a, bs.T).T, rtol=1e-10, atol=1e-12)
    assert bool(sol.converged.all())
    assert len(calls) < 100  # not 200_000: the loop stopped, not just the masked lanes


def test_solver_under_grad_stops_too():
    a = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    matvec, calls = _counted(a)
    g = torch.func.grad(lambda b: solvers.cg(matvec, b, max_iter=200_000).value.sum())(torch.ones(3, dtype=F64))
    torch.testing.assert_close(g, torch.tensor([1.0, 0.5, 1 / 3], dtype=F64))
    assert len(calls) < 100


# ---------------------------------------------------------------------------------------
# torch.compile


def _fixed_point():
    T = lambda z, a: 0.5 * torch.tanh(z) + a

    @custom_fixed_point(T)
    def solver(init, a):
        z = init
        for _ in range(40):
            z = T(z, a)
        return z

    return lambda a: solver(torch.zeros(2, dtype=F64), a)


@pytest.mark.parametrize("transform", ["value", "grad", "jvp", "vmap"])
def test_compile_fullgraph_refuses_with_the_reason(transform):
    # torch.compile would inline Root.forward and drop the implicit rules (zero derivatives)
    f = _fixed_point()
    fn = {
        "value": f,
        "grad": functx.grad(lambda a: f(a).sum()),
        "jvp": lambda a: torch.func.jvp(f, (a,), (torch.ones_like(a),))[1],
        "vmap": functx.vmap(f),
    }[transform]
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"functx.implicit runs eagerly"):
        torch.compile(fn, fullgraph=True, backend="eager")(A)
    torch._dynamo.reset()


def test_compile_runs_the_value_and_vmap_eagerly_at_a_graph_break():
    f = _fixed_point()
    a = torch.tensor([[0.3, -0.2], [0.1, 0.4]], dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch.compile's graph-break notices
        value = torch.compile(f, backend="eager")(a[0])
        batched = torch.compile(functx.vmap(f), backend="eager")(a)
    torch.testing.assert_close(value, f(a[0]), rtol=0, atol=0)
    torch.testing.assert_close(batched, torch.stack([f(ai) for ai in a]), rtol=1e-14, atol=1e-14)
    torch._dynamo.reset()


def test_fixed_trip_count_warns_when_max_iter_is_large(monkeypatch):
    # where no flag can be read (here fake tensors, as under tracing) every iteration runs
    from torch._subclasses.fake_tensor import FakeTensorMode

    from functx._solvers import _common

    monkeypatch.setattr(_common, "LARGE_MAX_ITER", 5)
    for name in ("cg", "gmres"):
        with FakeTensorMode():
            a, b = torch.eye(3, dtype=F64), torch.ones(3, dtype=F64)
            with pytest.warns(RuntimeWarning, match=r"max_iter=6 iterations will all run"):
                getattr(solvers, name)(lambda x: a @ x, b, max_iter=6)
    b = torch.ones(3, dtype=F64)
    functx.vmap(lambda b: solvers.cg(lambda x: x, b, max_iter=6))(b[None])  # readable: no warning
