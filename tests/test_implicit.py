"""functx.implicit: derivatives of solutions against closed forms, by every transform.

References are independent: closed forms recomputed here with dense float64 solves,
autograd through unrolled iterations (DEQ), autograd through a direct solve, and central
finite differences. Error paths are in test_implicit_errors.py.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_tree_allclose, check_grads

import functx
from functx import solvers
from functx.implicit import (
    custom_fixed_point,
    custom_root,
    implicit_hessian,
    implicit_jacobian,
    root_jvp,
    root_vjp,
)

D = torch.float64
TOL = dict(rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------------------
# Ridge regression: z*(lam) = argmin ||X z - y||^2 / 2 + lam ||z||^2 / 2 (lam scalar or per feature)


class Ridge:
    def __init__(self, n: int = 12, p: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.p = p
        self.X, self.y = torch.randn(n, p, generator=g, dtype=D), torch.randn(n, generator=g, dtype=D)
        self.Xv, self.yv = torch.randn(n, p, generator=g, dtype=D), torch.randn(n, generator=g, dtype=D)

    # the implicit function
    def F(self, z, lam, X, y):
        return X.T @ (X @ z - y) + lam * z

    def solver(self, **options):
        @custom_root(self.F, **options)
        def ridge(init, lam, X, y):  # exact inner solve (the implicit rules never see it)
            return torch.linalg.solve(X.T @ X + torch.diag(lam * torch.ones(X.shape[1], dtype=D)), X.T @ y)

        return ridge

    def loss(self, **options):
        ridge = self.solver(**options)

        def L(lam):
            z = ridge(torch.zeros(self.p, dtype=D), lam, self.X, self.y)
            return 0.5 * ((self.Xv @ z - self.yv) ** 2).sum()

        return L

    # closed forms
    def pieces(self, lam):
        A = self.X.T @ self.X + torch.diag(lam * torch.ones(self.p, dtype=D))
        z = torch.linalg.solve(A, self.X.T @ self.y)
        g = self.Xv.T @ (self.Xv @ z - self.yv)
        return A, z, g

    def scalar_derivatives(self, lam):
        """L', L'', L''' for scalar lam (issue formulas; L''' differentiates once more)."""
        A, z, g = self.pieces(lam)
        B = torch.linalg.inv(A)
        C = self.Xv.T @ self.Xv
        d1 = -g @ B @ z
        d2 = (self.Xv @ B @ z).pow(2).sum() + 2 * g @ B @ B @ z
        d3 = -6 * z @ B @ C @ B @ B @ z - 6 * g @ B @ B @ B @ z
        return d1, d2, d3

    def vector_derivatives(self, lam):
        """Gradient and Hessian for per-feature lam: with u = A^-1 g, B = A^-1, C = Xv^T Xv,
        grad = -u * z and H = Z B U + Z B C B Z + U B Z (Z, U diagonal)."""
        A, z, g = self.pieces(lam)
        B = torch.linalg.inv(A)
        u = B @ g
        C = self.Xv.T @ self.Xv
        Z, U = torch.diag(z), torch.diag(u)
        return -u * z, Z @ B @ U + Z @ B @ C @ B @ Z + U @ B @ Z


@pytest.fixture(scope="module")
def ridge():
    return Ridge()


LAM = 0.7
ONE = torch.tensor(1.0, dtype=D)

FIRST_ORDER = {
    "grad": lambda L, lam: functx.grad(L)(lam),
    "jacrev": lambda L, lam: functx.jacrev(L)(lam),
    "jacfwd": lambda L, lam: functx.jacfwd(L)(lam),
    "vjp": lambda L, lam: functx.vjp(L, lam)[1](ONE)[0],
    "jvp": lambda L, lam: functx.jvp(L, (lam,), (ONE,))[1],
    "torch.func.grad": lambda L, lam: torch.func.grad(L)(lam),
    "value_and_grad": lambda L, lam: functx.value_and_grad(L)(lam)[1],
    "linearize": lambda L, lam: functx.linearize(L, lam)[1](ONE),
}


def _eager_grad(L, lam):
    leaf = lam.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(L(leaf), leaf)
    return g


FIRST_ORDER["eager backward"] = _eager_grad


def _eager_second(L, lam):
    leaf = lam.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(L(leaf), leaf, create_graph=True)
    (h,) = torch.autograd.grad(g, leaf)
    return h


SECOND_ORDER = {
    "grad(grad)": lambda L, lam: functx.grad(functx.grad(L))(lam),
    "hessian auto": lambda L, lam: functx.hessian(L)(lam),
    "hessian rev-rev": lambda L, lam: functx.hessian(L, mode="rev-rev")(lam),
    "hessian fwd-rev": lambda L, lam: functx.hessian(L, mode="fwd-rev")(lam),
    "jacfwd(jacfwd)": lambda L, lam: functx.jacfwd(functx.jacfwd(L))(lam),
    "jacrev(jacfwd)": lambda L, lam: functx.jacrev(functx.jacfwd(L))(lam),
    "jacfwd(jacrev)": lambda L, lam: functx.jacfwd(functx.jacrev(L))(lam),
    "jacrev(jacrev)": lambda L, lam: functx.jacrev(functx.jacrev(L))(lam),
    "jvp(grad)": lambda L, lam: functx.jvp(functx.grad(L), (lam,), (ONE,))[1],
    "jvp(jvp)": lambda L, lam: functx.jvp(lambda l: functx.jvp(L, (l,), (ONE,))[1], (lam,), (ONE,))[1],
    "hvp rev-rev": lambda L, lam: functx.hvp(L, (lam,), (ONE,), mode="rev-rev")[1][0],
    "hvp fwd-rev": lambda L, lam: functx.hvp(L, (lam,), (ONE,), mode="fwd-rev")[1][0],
    "hvp rev-fwd": lambda L, lam: functx.hvp(L, (lam,), (ONE,), mode="rev-fwd")[1][0],
    "torch.func.hessian": lambda L, lam: torch.func.hessian(L)(lam),
    "torch.func.jacfwd(jacfwd)": lambda L, lam: torch.func.jacfwd(torch.func.jacfwd(L))(lam),
    "eager double backward": _eager_second,
}

SOLVES = {"cg": dict(symmetric=True), "gmres": dict()}


@pytest.mark.parametrize("solve", SOLVES)
@pytest.mark.parametrize("mode", FIRST_ORDER)
def test_ridge_first_derivative(ridge, solve, mode):
    lam = torch.tensor(LAM, dtype=D)
    got = FIRST_ORDER[mode](ridge.loss(**SOLVES[solve]), lam)
    torch.testing.assert_close(got, ridge.scalar_derivatives(lam)[0], **TOL)


@pytest.mark.parametrize("solve", SOLVES)
@pytest.mark.parametrize("mode", SECOND_ORDER)
def test_ridge_second_derivative(ridge, solve, mode):
    lam = torch.tensor(LAM, dtype=D)
    got = SECOND_ORDER[mode](ridge.loss(**SOLVES[solve]), lam)
    torch.testing.assert_close(got, ridge.scalar_derivatives(lam)[1], **TOL)


THIRD_ORDER = {
    "jacfwd^3": lambda L: functx.jacfwd(functx.jacfwd(functx.jacfwd(L))),
    "jacrev^3": lambda L: functx.jacrev(functx.jacrev(functx.jacrev(L))),
    "grad^3": lambda L: functx.grad(functx.grad(functx.grad(L))),
    "jacfwd(jacfwd(jacrev))": lambda L: functx.jacfwd(functx.jacfwd(functx.jacrev(L))),
    "jacfwd(jacrev(jacfwd))": lambda L: functx.jacfwd(functx.jacrev(functx.jacfwd(L))),
    "jacrev(jacfwd(jacfwd))": lambda L: functx.jacrev(functx.jacfwd(functx.jacfwd(L))),
}


@pytest.mark.parametrize("mode", THIRD_ORDER)
def test_ridge_third_derivative(ridge, mode):
    lam = torch.tensor(LAM, dtype=D)
    got = THIRD_ORDER[mode](ridge.loss())(lam)
    torch.testing.assert_close(got, ridge.scalar_derivatives(lam)[2], **TOL)


@pytest.mark.parametrize("solve", ["lu", "bicgstab", "minres", "cholesky", "normal_cg"])
def test_ridge_every_linear_solver(ridge, solve):
    lam = torch.tensor(LAM, dtype=D)
    L = ridge.loss(solve=solve)
    _, d2, _ = ridge.scalar_derivatives(lam)
    torch.testing.assert_close(functx.hessian(L, mode="fwd-rev")(lam), d2, **TOL)
    torch.testing.assert_close(functx.jacfwd(functx.jacfwd(L))(lam), d2, **TOL)


def test_ridge_user_supplied_solve(ridge):
    calls = []

    def dense(matvec, b):  # materialise the operator and factor it (solves reported nothing)
        calls.append(b.shape)
        A = torch.func.vmap(matvec, out_dims=1)(torch.eye(b.shape[0], dtype=b.dtype))
        return torch.linalg.solve(A, b)

    lam = torch.tensor(LAM, dtype=D)
    L = ridge.loss(solve=dense)
    torch.testing.assert_close(functx.hessian(L)(lam), ridge.scalar_derivatives(lam)[1], **TOL)
    assert calls, "the user's solve was not used"


VMAPPABLE = [(k, 0) for k in FIRST_ORDER if "eager" not in k] + [(k, 1) for k in SECOND_ORDER if "eager" not in k]


@pytest.mark.parametrize("mode,order", VMAPPABLE, ids=[f"vmap({k})" for k, _ in VMAPPABLE])
def test_ridge_vmap_over_many_lambdas(ridge, mode, order):
    lams = torch.linspace(0.05, 3.0, 5, dtype=D)
    fn = (FIRST_ORDER if order == 0 else SECOND_ORDER)[mode]
    L = ridge.loss(symmetric=True)
    got = functx.vmap(lambda lam: fn(L, lam))(lams)
    expected = torch.stack([ridge.scalar_derivatives(lam)[order] for lam in lams])
    torch.testing.assert_close(got, expected, **TOL)


def test_ridge_torch_vmap_of_torch_func(ridge):
    lams = torch.linspace(0.05, 3.0, 5, dtype=D)
    L = ridge.loss()
    got = torch.vmap(torch.func.hessian(L))(lams)
    torch.testing.assert_close(got, torch.stack([ridge.scalar_derivatives(lam)[1] for lam in lams]), **TOL)


def test_ridge_vmap_over_data(ridge):
    """vmap over datasets (the X, y arguments), hypergradient per dataset."""
    ridges = [Ridge(seed=s) for s in range(3)]
    Xs, ys = torch.stack([r.X for r in ridges]), torch.stack([r.y for r in ridges])
    solver = ridge.solver()

    def L(lam, X, y):
        z = solver(torch.zeros(ridge.p, dtype=D), lam, X, y)
        return 0.5 * ((ridge.Xv @ z - ridge.yv) ** 2).sum()

    lam = torch.tensor(LAM, dtype=D)
    got = functx.vmap(functx.grad(L), in_dims=(None, 0, 0))(lam, Xs, ys)
    for r, g in zip(ridges, got):
        r.Xv, r.yv = ridge.Xv, ridge.yv
        torch.testing.assert_close(g, r.scalar_derivatives(lam)[0], **TOL)


@pytest.mark.parametrize("mode", ["grad", "jacfwd", "hessian", "hessian fwd-rev", "jacfwd(jacfwd)", "vmap(grad)"])
def test_ridge_per_feature_lambda(ridge, mode):
    lam = torch.tensor([0.3, 1.1, 0.7, 2.0], dtype=D)
    L = ridge.loss(symmetric=True)
    grad, hess = ridge.vector_derivatives(lam)
    if mode == "vmap(grad)":
        lams = torch.stack([lam, 2 * lam, lam / 3])
        got = functx.vmap(functx.grad(L))(lams)
        torch.testing.assert_close(got, torch.stack([ridge.vector_derivatives(l)[0] for l in lams]), **TOL)
        return
    fn = {
        "grad": functx.grad(L),
        "jacfwd": functx.jacfwd(L),
        "hessian": functx.hessian(L),
        "hessian fwd-rev": functx.hessian(L, mode="fwd-rev"),
        "jacfwd(jacfwd)": functx.jacfwd(functx.jacfwd(L)),
    }[mode]
    torch.testing.assert_close(fn(lam), grad if mode in ("grad", "jacfwd") else hess, **TOL)


def test_ridge_check_grads(ridge):
    """JVPs against central differences and the adjoint identity, to second order, in (lam, y)."""
    solver = ridge.solver(symmetric=True)
    f = lambda lam, y: solver(torch.zeros(ridge.p, dtype=D), lam, ridge.X, y)
    check_grads(f, (torch.tensor(LAM, dtype=D), ridge.y), order=2)


# ---------------------------------------------------------------------------------------
# A dict solution with an unpenalised intercept, solved by CG on the pytree.


def test_dict_solution_with_intercept(ridge):
    X, y, Xv, yv = ridge.X, ridge.y, ridge.Xv, ridge.yv

    def inner(z, lam, X, y):
        return 0.5 * ((X @ z["w"] + z["b"] - y) ** 2).sum() + 0.5 * lam * (z["w"] ** 2).sum()

    def normal_equations(lam, X, y):
        matvec = lambda z: {"w": X.T @ (X @ z["w"] + z["b"]) + lam * z["w"], "b": (X @ z["w"] + z["b"]).sum()}
        return matvec, {"w": X.T @ y, "b": y.sum()}

    @custom_root(functx.grad(inner), symmetric=True)
    def fit(init, lam, X, y):  # an iterative pytree solver (functx.solvers.cg)
        matvec, b = normal_equations(lam, X, y)
        return solvers.cg(matvec, b, init, rtol=1e-14).value

    init = {"w": torch.zeros(ridge.p, dtype=D), "b": torch.zeros((), dtype=D)}
    L = lambda lam: 0.5 * ((Xv @ fit(init, lam, X, y)["w"] + fit(init, lam, X, y)["b"] - yv) ** 2).sum()

    # closed form on the augmented design [X, 1] with penalty P = diag(1, ..., 1, 0)
    lam = torch.tensor(LAM, dtype=D)
    Xa, Xva = torch.cat([X, torch.ones(len(X), 1, dtype=D)], 1), torch.cat([Xv, torch.ones(len(Xv), 1, dtype=D)], 1)
    P = torch.diag(torch.tensor([1.0] * ridge.p + [0.0], dtype=D))
    A = Xa.T @ Xa + lam * P
    za = torch.linalg.solve(A, Xa.T @ y)
    g = Xva.T @ (Xva @ za - yv)
    dz = -torch.linalg.solve(A, P @ za)
    d1 = g @ dz
    d2 = (Xva @ dz).pow(2).sum() + 2 * g @ torch.linalg.solve(A, P @ torch.linalg.solve(A, P @ za))

    z = fit(init, lam, X, y)
    torch.testing.assert_close(torch.cat([z["w"], z["b"][None]]), za, **TOL)
    torch.testing.assert_close(functx.grad(L)(lam), d1, **TOL)
    torch.testing.assert_close(functx.hessian(L)(lam), d2, **TOL)
    torch.testing.assert_close(functx.jacfwd(functx.jacfwd(L))(lam), d2, **TOL)
    jac = functx.jacfwd(lambda lam: fit(init, lam, X, y))(lam)
    assert_tree_allclose(jac, {"w": dz[:-1], "b": dz[-1]}, **TOL)
    lams = torch.tensor([0.2, 0.7, 1.5], dtype=D)
    batched = functx.vmap(functx.grad(L))(lams)
    torch.testing.assert_close(batched[1], d1, **TOL)


def test_kwargs_are_differentiated(ridge):
    solver = ridge.solver(symmetric=True)
    lam = torch.tensor(LAM, dtype=D)
    L = lambda lam: (
        0.5 * ((ridge.Xv @ solver(torch.zeros(ridge.p, dtype=D), lam=lam, X=ridge.X, y=ridge.y) - ridge.yv) ** 2).sum()
    )
    torch.testing.assert_close(functx.grad(L)(lam), ridge.scalar_derivatives(lam)[0], **TOL)


def test_init_gets_no_derivative(ridge):
    solver = ridge.solver(symmetric=True)
    init = torch.ones(ridge.p, dtype=D)
    grads = functx.grad(lambda init, lam: solver(init, lam, ridge.X, ridge.y).sum(), argnums=(0, 1))(
        init, torch.tensor(LAM, dtype=D)
    )
    torch.testing.assert_close(grads[0], torch.zeros_like(init))


def test_has_aux_returns_aux_and_vmaps(ridge):
    @custom_root(ridge.F, symmetric=True, has_aux=True)
    def solver(init, lam, X, y):
        sol = solvers.cg(lambda v: X.T @ (X @ v) + lam * v, X.T @ y, init)
        return sol.value, {"iterations": sol.num_steps, "method": "cg"}

    lam = torch.tensor(LAM, dtype=D)
    init = torch.zeros(ridge.p, dtype=D)
    z, aux = solver(init, lam, ridge.X, ridge.y)
    assert aux["method"] == "cg" and aux["iterations"].dtype == torch.int64 and int(aux["iterations"]) > 0
    grad, aux = functx.grad(
        lambda l: (solver(init, l, ridge.X, ridge.y)[0].sum(), solver(init, l, ridge.X, ridge.y)[1]), has_aux=True
    )(lam)
    A, z_ref, _ = ridge.pieces(lam)
    torch.testing.assert_close(grad, -torch.linalg.solve(A, z_ref).sum(), **TOL)
    zs, auxs = functx.vmap(lambda l: solver(init, l, ridge.X, ridge.y))(torch.tensor([0.5, 1.0], dtype=D))
    assert zs.shape == (2, ridge.p) and auxs["iterations"].shape == (2,)


# ---------------------------------------------------------------------------------------
# Deep equilibrium model: z = tanh(W z + U x + b), ||W|| < 1.


class Deq:
    h, d, steps = 6, 3, 70

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        W = torch.randn(self.h, self.h, generator=g, dtype=D)
        self.params = {
            "W": 0.5 * W / torch.linalg.matrix_norm(W, 2),
            "U": torch.randn(self.h, self.d, generator=g, dtype=D),
            "b": torch.randn(self.h, generator=g, dtype=D),
        }
        self.x = torch.randn(self.d, generator=g, dtype=D)
        self.xs = torch.randn(4, self.d, generator=g, dtype=D)

    @staticmethod
    def T(z, p, x):
        return torch.tanh(p["W"] @ z + p["U"] @ x + p["b"])

    def implicit(self):
        @custom_fixed_point(self.T)
        def deq(init, p, x):
            z = init
            for _ in range(200):
                z = self.T(z, p, x)
            return z

        return lambda p, x: deq(torch.zeros(self.h, dtype=D), p, x)

    def unrolled(self, p, x):
        z = torch.zeros(self.h, dtype=D)
        for _ in range(self.steps):
            z = self.T(z, p, x)
        return z


@pytest.fixture(scope="module")
def deq():
    return Deq()


def _deq_loss(f):
    return lambda p, x: (f(p, x) ** 2).sum() + f(p, x)[0]


def test_deq_gradients_match_unrolled(deq):
    got = functx.grad(_deq_loss(deq.implicit()))(deq.params, deq.x)
    expected = functx.grad(_deq_loss(deq.unrolled))(deq.params, deq.x)
    assert_tree_allclose(got, expected, rtol=1e-10, atol=1e-10)


def test_deq_hessian_and_vmap_over_data(deq):
    implicit = deq.implicit()
    hess = lambda f: functx.hessian(lambda b: _deq_loss(f)({**deq.params, "b": b}, deq.x))(deq.params["b"])
    torch.testing.assert_close(hess(implicit), hess(deq.unrolled), rtol=1e-10, atol=1e-10)
    per_sample = lambda f: functx.vmap(functx.grad(_deq_loss(f)), in_dims=(None, 0))(deq.params, deq.xs)
    assert_tree_allclose(per_sample(implicit), per_sample(deq.unrolled), rtol=1e-10, atol=1e-10)


def test_deq_forward_mode_matches_unrolled(deq):
    tangent = {k: torch.ones_like(v) for k, v in deq.params.items()}
    got = functx.jvp(lambda p: deq.implicit()(p, deq.x), (deq.params,), (tangent,))[1]
    expected = functx.jvp(lambda p: deq.unrolled(p, deq.x), (deq.params,), (tangent,))[1]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------
# Multinomial logistic regression with L2: second derivatives by finite differences.


class Logistic:
    n, d, c = 30, 3, 3

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(2)
        self.X = torch.randn(self.n, self.d, generator=g, dtype=D)
        self.labels = torch.randint(0, self.c, (self.n,), generator=g)
        self.Xv = torch.randn(self.n, self.d, generator=g, dtype=D)
        self.labels_v = torch.randint(0, self.c, (self.n,), generator=g)

    @staticmethod
    def inner(W, lam, X, labels):
        return torch.nn.functional.cross_entropy(X @ W, labels, reduction="sum") + 0.5 * lam * (W**2).sum()

    def loss(self):
        inner = self.inner

        @custom_root(functx.grad(inner), symmetric=True)
        def fit(init, lam, X, labels):  # Newton's method with a dense Hessian
            W = init
            for _ in range(25):
                g = functx.grad(inner)(W, lam, X, labels).reshape(-1)
                H = functx.hessian(inner)(W, lam, X, labels).reshape(g.numel(), g.numel())
                W = W - torch.linalg.solve(H, g).reshape(W.shape)
            return W

        def L(lam):
            W = fit(torch.zeros(self.d, self.c, dtype=D), lam, self.X, self.labels)
            return torch.nn.functional.cross_entropy(self.Xv @ W, self.labels_v)

        return L


def test_logistic_second_derivative_matches_finite_differences():
    problem = Logistic()
    L = problem.loss()
    lam, eps = torch.tensor(0.8, dtype=D), 1e-4
    d1 = functx.grad(L)
    fd = (d1(lam + eps) - d1(lam - eps)) / (2 * eps)
    for second in (functx.hessian(L)(lam), functx.jacfwd(functx.jacfwd(L))(lam), functx.grad(functx.grad(L))(lam)):
        torch.testing.assert_close(second, fd, rtol=1e-6, atol=1e-9)
    lams = torch.tensor([0.4, 0.8], dtype=D)  # vmap over lam, labels are a static int tensor
    torch.testing.assert_close(functx.vmap(functx.grad(L))(lams)[1], d1(lam), **TOL)


# ---------------------------------------------------------------------------------------
# implicit_jacobian / implicit_hessian (sensitivity_torch's API) and root_vjp / root_jvp


def _k(ridge):
    return lambda z, lam: ridge.X.T @ (ridge.X @ z - ridge.y) + lam * z


def test_implicit_jacobian_and_hessian_closed_forms(ridge):
    lam = torch.tensor(LAM, dtype=D)
    A, z, g = ridge.pieces(lam)
    B = torch.linalg.inv(A)
    k = _k(ridge)
    d1, d2, _ = ridge.scalar_derivatives(lam)
    torch.testing.assert_close(implicit_jacobian(k, z, lam), -B @ z, **TOL)  # dz/dlam
    torch.testing.assert_close(implicit_jacobian(k, z, lam, Dg=g), d1, **TOL)
    torch.testing.assert_close(implicit_jacobian(k, z, lam, jvp_vec=2 * ONE), -2 * B @ z, **TOL)
    jac, second = implicit_hessian(k, z, lam)
    torch.testing.assert_close(jac, -B @ z, **TOL)
    torch.testing.assert_close(second, 2 * B @ B @ z, **TOL)  # d2z/dlam2
    C = ridge.Xv.T @ ridge.Xv
    for Hg in (C, lambda v: C @ v):
        first, second = implicit_hessian(k, z, lam, Dg=g, Hg=Hg)
        torch.testing.assert_close(first, d1, **TOL)
        torch.testing.assert_close(second, d2, **TOL)
        first, second = implicit_hessian(k, z, lam, Dg=g, Hg=Hg, jvp_vec=3 * ONE)
        torch.testing.assert_close(first, 3 * d1, **TOL)
        torch.testing.assert_close(second, 3 * d2, **TOL)
    first, second = implicit_hessian(k, z, lam, Dg=g)  # linear outer objective: Hg = 0
    torch.testing.assert_close(second, 2 * g @ B @ B @ z, **TOL)


def test_implicit_jacobian_several_params_pytrees_and_vmap(ridge):
    lam = torch.tensor([0.3, 1.1, 0.7, 2.0], dtype=D)
    A, z, g = ridge.pieces(lam)
    B = torch.linalg.inv(A)
    k = lambda z, params, y: {"w": ridge.X.T @ (ridge.X @ z["w"] - y) + params["lam"] * z["w"]}
    zt, pt = {"w": z}, {"lam": lam}
    jac_lam, jac_y = implicit_jacobian(k, zt, pt, ridge.y)
    assert_tree_allclose(jac_lam, {"w": {"lam": -B * z}}, **TOL)  # dz_i/dlam_j = -B_ij z_j
    assert_tree_allclose(jac_y, {"w": B @ ridge.X.T}, **TOL)
    vjps = implicit_jacobian(k, zt, pt, ridge.y, Dg={"w": g})
    assert_tree_allclose(vjps[0], {"lam": -(B @ g) * z}, **TOL)
    jvps = implicit_jacobian(k, zt, pt, ridge.y, jvp_vec=({"lam": torch.ones_like(lam)}, torch.zeros_like(ridge.y)))
    assert_tree_allclose(jvps[0], {"w": -B @ z}, **TOL)
    assert_tree_allclose(jvps[1], {"w": torch.zeros_like(z)}, **TOL)
    (grad_lam, _), (hess_lam, _) = implicit_hessian(
        k, zt, pt, ridge.y, Dg={"w": g}, Hg={"w": {"w": ridge.Xv.T @ ridge.Xv}}
    )
    grad, hess = ridge.vector_derivatives(lam)
    assert_tree_allclose(grad_lam, {"lam": grad}, **TOL)
    assert_tree_allclose(hess_lam, {"lam": {"lam": hess}}, **TOL)

    def jacobian_at(l):
        zz = torch.linalg.solve(ridge.X.T @ ridge.X + torch.diag(l), ridge.X.T @ ridge.y)
        return implicit_jacobian(lambda z, l: ridge.X.T @ (ridge.X @ z - ridge.y) + l * z, zz, l, symmetric=True)

    lams = torch.stack([lam, 2 * lam])
    batched = functx.vmap(jacobian_at)(lams)
    for l, J in zip(lams, batched):
        Al, zl, _ = ridge.pieces(l)
        torch.testing.assert_close(J, -torch.linalg.inv(Al) * zl, **TOL)


def test_root_vjp_jvp_closed_forms_and_adjoint(ridge):
    lam = torch.tensor(LAM, dtype=D)
    A, z, g = ridge.pieces(lam)
    F = lambda z, lam, y, flag: ridge.X.T @ (ridge.X @ z - y) + lam * z
    args = (lam, ridge.y, 3)  # a non-tensor argument passes through
    lam_bar, y_bar, flag_bar = root_vjp(F, z, args, g)
    torch.testing.assert_close(lam_bar, -g @ torch.linalg.solve(A, z), **TOL)
    torch.testing.assert_close(y_bar, ridge.X @ torch.linalg.solve(A, g), **TOL)
    assert flag_bar is None
    t_lam, t_y = torch.tensor(0.3, dtype=D), torch.linspace(-1, 1, len(ridge.y), dtype=D)
    z_dot = root_jvp(F, z, args, (t_lam, t_y, None))
    torch.testing.assert_close(z_dot, torch.linalg.solve(A, ridge.X.T @ t_y - t_lam * z), **TOL)
    torch.testing.assert_close(g @ z_dot, lam_bar * t_lam + y_bar @ t_y, **TOL)  # <c, J t> = <J^T c, t>


def test_root_vjp_is_differentiable(ridge):
    """Second derivatives through root_vjp when the solution comes from custom_root."""
    solver = ridge.solver(symmetric=True)

    def first(lam):
        z = solver(torch.zeros(ridge.p, dtype=D), lam, ridge.X, ridge.y)
        g = ridge.Xv.T @ (ridge.Xv @ z - ridge.yv)
        return root_vjp(ridge.F, z, (lam, ridge.X, ridge.y), g, symmetric=True)[0]

    lam = torch.tensor(LAM, dtype=D)
    _, d2, _ = ridge.scalar_derivatives(lam)
    torch.testing.assert_close(functx.grad(first)(lam), d2, **TOL)
    torch.testing.assert_close(functx.jacfwd(first)(lam), d2, **TOL)


# ---------------------------------------------------------------------------------------
# Hygiene


def test_inputs_are_not_mutated(ridge):
    solver = ridge.solver(symmetric=True)
    lam = torch.tensor(LAM, dtype=D, requires_grad=True)
    X, y = ridge.X.clone(), ridge.y.clone()
    init = torch.zeros(ridge.p, dtype=D)
    z = solver(init, lam, X, y)
    z.sum().backward()
    assert not X.requires_grad and not y.requires_grad and not init.requires_grad
    assert X.grad is None and init.grad is None and lam.grad is not None
    assert torch.equal(X, ridge.X) and torch.equal(y, ridge.y) and torch.equal(init, torch.zeros(ridge.p, dtype=D))


def test_captured_constants_and_vmapped_closures_are_fine(ridge):
    """Tensors captured as constants (no requires_grad, not traced) are allowed, including
    under vmap, where torch restores the batching of captured tensors."""
    X, y = ridge.X, ridge.y

    def fit_for(lam):
        F = lambda z, dummy: X.T @ (X @ z - y) + lam * z  # lam captured: only vmapped here

        @custom_root(F)
        def fit(init, dummy):
            return torch.linalg.solve(X.T @ X + lam * torch.eye(ridge.p, dtype=D), X.T @ y)

        return fit(torch.zeros(ridge.p, dtype=D), ONE)

    lams = torch.tensor([0.3, 0.9], dtype=D)
    torch.testing.assert_close(functx.vmap(fit_for)(lams), torch.stack([ridge.pieces(l)[1] for l in lams]), **TOL)


def test_float32_default_tolerances(ridge):
    lam = torch.tensor(LAM, dtype=torch.float32)
    ridge32 = Ridge()
    for name in ("X", "y", "Xv", "yv"):
        setattr(ridge32, name, getattr(ridge, name).float())
    solver = custom_root(lambda z, lam, X, y: X.T @ (X @ z - y) + lam * z, symmetric=True)(
        lambda init, lam, X, y: torch.linalg.solve(X.T @ X + lam * torch.eye(ridge.p), X.T @ y)
    )
    L = lambda lam: (
        0.5 * ((ridge32.Xv @ solver(torch.zeros(ridge.p), lam, ridge32.X, ridge32.y) - ridge32.yv) ** 2).sum()
    )
    torch.testing.assert_close(
        functx.grad(L)(lam).double(), ridge.scalar_derivatives(lam.double())[0], rtol=1e-4, atol=1e-5
    )
