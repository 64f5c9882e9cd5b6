"""Tests for functx.solvers.

Every solution is checked against an independent float64 reference (``torch.linalg.solve``,
``torch.linalg.lstsq`` or a closed form recomputed here) on small random systems of the
structure each solver is meant for: symmetric positive definite (cg, cholesky), symmetric
indefinite (minres), nonsymmetric (gmres, bicgstab, lu) and least squares (normal_cg).
Residuals and convergence flags are recomputed here from the returned solution.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from helpers import assert_tree_allclose, tree_catalogue, tree_leaves, tree_map

import functx
from functx import solvers
from functx._solvers._common import early_exit_allowed
from functx._torch_internals import unwrap_all

F64, F32 = torch.float64, torch.float32
N = 12  # unknowns in the pytree systems below
ITERATIVE = ["cg", "minres", "gmres", "bicgstab", "normal_cg"]
DENSE = ["lu", "cholesky"]
ALL = ITERATIVE + DENSE
# The structure each solver is tested on.
KIND = {
    "cg": "spd",
    "cholesky": "spd",
    "minres": "sym",
    "gmres": "gen",
    "bicgstab": "gen",
    "lu": "gen",
    "normal_cg": "gen",
}
SYMMETRIC = {"cg", "cholesky", "minres"}  # these read only the symmetric part of A


# ---------------------------------------------------------------------------------------
# Systems (built in float64, then cast)


def _orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=gen))
    return q * torch.sign(torch.diagonal(r))


def make_matrix(kind: str, n: int = N, seed: int = 0, dtype: torch.dtype = F64, cond: float = 10.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "gen":  # nonsymmetric, eigenvalues clustered around 2: well conditioned for Krylov
        a = 2 * torch.eye(n, dtype=F64) + 0.5 * torch.randn(n, n, dtype=F64, generator=gen) / math.sqrt(n)
        return a.to(dtype)
    q = _orthogonal(n, gen)
    eig = torch.logspace(0, math.log10(cond), n, dtype=F64)
    if kind == "sym":
        eig = eig * torch.tensor([1.0, -1.0], dtype=F64).repeat(n)[:n]
    return ((q * eig) @ q.T).to(dtype)


def rand(*shape: int, seed: int = 1, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(shape, dtype=F64, generator=torch.Generator().manual_seed(seed)).to(dtype)


def to_vec(tree: dict) -> torch.Tensor:
    return torch.cat([tree["u"].reshape(-1), tree["v"]])


def to_tree(v: torch.Tensor) -> dict:
    return {"v": v[6:], "u": v[:6].reshape(3, 2)}  # insertion order differs from sorted order on purpose


def tree_operator(a: torch.Tensor):
    return lambda x: to_tree(a @ to_vec(x))


def run(name: str, a: torch.Tensor, b, **options) -> solvers.Solution:
    """Solve with a matrix acting on vectors (tensor ``b``) or on the {"u", "v"} pytree."""
    matvec = (lambda x: a @ x) if isinstance(b, torch.Tensor) else tree_operator(a)
    return getattr(solvers, name)(matvec, b, **options)


def reference(name: str, a: torch.Tensor, b: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """float64 solution of the system ``name`` solves (normal equations for normal_cg)."""
    a, b = a.to(F64), b.to(F64)
    eye = torch.eye(a.shape[-1], dtype=F64)
    if name == "normal_cg":
        return torch.linalg.solve(a.mT @ a + ridge * eye, a.mT @ b[..., None])[..., 0]
    return torch.linalg.solve(a + ridge * eye, b[..., None])[..., 0]


def residual(name: str, a: torch.Tensor, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if name == "normal_cg":
        return torch.linalg.vector_norm(a.mT @ b - a.mT @ (a @ x))
    return torch.linalg.vector_norm(b - a @ x)


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(x.to(F64) - ref) / torch.linalg.vector_norm(ref)).item()


# ---------------------------------------------------------------------------------------
# Accuracy against torch.linalg.solve, on pytrees, in float64 and float32


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", ALL)
def test_matches_dense_solve_on_pytree(name, dtype):
    a = make_matrix(KIND[name], dtype=dtype)
    b = to_tree(rand(N, dtype=dtype))
    sol = run(name, a, b)
    assert tree_map(lambda t: (t.shape, t.dtype), sol.value) == tree_map(lambda t: (t.shape, t.dtype), b)
    x, bv = to_vec(sol.value), to_vec(b)
    assert relative_error(x, reference(name, a, bv)) < (1e-10 if dtype == F64 else 1e-4)
    # the reported residual is the true residual of the returned solution, and the verdict follows it
    assert sol.residual_norm.dtype == dtype and sol.residual_norm.shape == ()
    torch.testing.assert_close(
        sol.residual_norm, residual(name, a, x, bv), rtol=1e-3, atol=1e-12 if dtype == F64 else 1e-5
    )
    assert sol.converged.dtype == torch.bool and bool(sol.converged)
    assert sol.num_steps.dtype == torch.int64 and sol.num_steps.shape == ()
    assert (sol.num_steps > 0) if name in ITERATIVE else (sol.num_steps == 0)


def test_default_float64_tolerance_gives_ten_digits():
    # JAXopt-style defaults (tol=1e-5) lose 5-6 digits; ours must give ~1e-10 on a cond-100 system
    a, b = make_matrix("spd", n=40, cond=100.0), rand(40)
    for name in ["cg", "minres", "gmres", "bicgstab"]:
        sol = run(name, a, b, max_iter=400)
        assert bool(sol.converged), name
        assert relative_error(sol.value, torch.linalg.solve(a, b)) < 1e-10, name
        assert sol.residual_norm <= 1e-12 * torch.linalg.vector_norm(b)


@pytest.mark.parametrize("name", ALL)
def test_initial_guess(name):
    a, b = make_matrix(KIND[name], n=40, cond=100.0), rand(40)
    ref = reference(name, a, b)
    cold = run(name, a, b)
    warm = run(name, a, b, x0=ref + 1e-6 * rand(40, seed=5))
    assert relative_error(warm.value, ref) < 1e-10 and bool(warm.converged) and bool(cold.converged)
    exact = run(name, a, b, x0=ref)  # already converged: no iteration, the guess comes back
    if name in ITERATIVE:
        assert exact.num_steps == 0
        assert torch.equal(exact.value, ref)


def test_gmres_restart_and_full():
    a, b = make_matrix("gen", n=30), rand(30)
    ref = torch.linalg.solve(a, b)
    for restart in (3, 7, 30, 100):
        sol = solvers.gmres(lambda x: a @ x, b, restart=restart)
        assert bool(sol.converged) and relative_error(sol.value, ref) < 1e-10, restart
    # full GMRES on n = 30 unknowns: one cycle of at most n steps suffices
    assert bool(solvers.gmres(lambda x: a @ x, b, restart=30, max_iter=30).converged)


# ---------------------------------------------------------------------------------------
# vmap: over right-hand sides (including a zero and a large one) and over operators


@pytest.mark.parametrize("name", ALL)
def test_vmap_over_right_hand_sides(name):
    a = make_matrix(KIND[name])
    bs = rand(5, N)
    bs[1] = 0.0
    bs[3] *= 1e3
    sols = torch.vmap(lambda b: tuple(run(name, a, b)))(bs)
    x, iterations, residual_norm, converged = sols
    ref = reference(name, a, bs)
    torch.testing.assert_close(x, ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(x[1], torch.zeros(N, dtype=F64))  # zero right-hand side: exactly zero, no NaN
    assert bool(converged.all()) and not torch.isnan(x).any()
    # each lane stops on its own: the iteration counts of separate eager solves (up to one
    # iteration: batched products round differently), and its own residual below its own tolerance
    eager = [run(name, a, b) for b in bs]
    assert all(abs(int(k) - int(s.num_steps)) <= 1 for k, s in zip(iterations, eager))
    scale = torch.linalg.vector_norm(a.mT @ bs.T, dim=0) if name == "normal_cg" else torch.linalg.vector_norm(bs, dim=1)
    recomputed = torch.stack([residual(name, a, xi, bi) for xi, bi in zip(x, bs)])
    torch.testing.assert_close(residual_norm / (scale + 1), recomputed / (scale + 1), rtol=0, atol=1e-15)
    if name in ITERATIVE:
        assert (residual_norm <= 1e-12 * scale).all()
    if name in ITERATIVE:
        assert iterations[1] == 0 and iterations[0] > 0


@pytest.mark.parametrize("name", ALL)
def test_vmap_over_operators(name):
    mats = torch.stack([make_matrix(KIND[name], seed=s) * scale for s, scale in [(0, 1.0), (1, 3.0), (2, 0.2)]])
    b = to_tree(rand(N))
    xs = functx.vmap(lambda m, b: run(name, m, b).value, in_dims=(0, None))(mats, b)
    ref = reference(name, mats, to_vec(b).expand(3, N))
    torch.testing.assert_close(torch.cat([xs["u"].reshape(3, -1), xs["v"]], dim=1), ref, rtol=1e-10, atol=1e-10)


def test_masked_path_under_transforms_matches_eager():
    # early exit only in plain eager mode; the masked fixed-trip-count path gives the same answer
    assert early_exit_allowed(torch.ones(2))
    seen = []
    torch.vmap(lambda t: seen.append(early_exit_allowed(t)) or t)(torch.ones(2, 2))
    # (a top-level functx.grad runs plain autograd, which is plain eager mode: use torch.func's)
    torch.func.grad(lambda t: seen.append(early_exit_allowed(t)) or t.sum())(torch.ones(2))
    assert seen == [False, False]
    a, b = make_matrix("sym"), rand(N)
    eager = solvers.minres(lambda x: a @ x, b)
    masked = functx.vmap(lambda b: tuple(solvers.minres(lambda x: a @ x, b)))(b[None])
    torch.testing.assert_close(masked[0][0], eager.value, rtol=0, atol=1e-14)
    assert masked[1][0] == eager.num_steps


# ---------------------------------------------------------------------------------------
# Failure is reported, never silent; no NaN for zero right-hand sides


@pytest.mark.parametrize("name", ITERATIVE)
def test_non_convergence_is_reported(name):
    a, b = make_matrix(KIND[name], cond=100.0), rand(N)
    for sol in (
        run(name, a, b, max_iter=2),
        torch.vmap(lambda b: solvers.Solution(*run(name, a, b, max_iter=2)))(b[None]),
    ):
        x = sol.value.reshape(N)
        assert not bool(sol.converged.all()) and (sol.num_steps == 2).all()
        torch.testing.assert_close(sol.residual_norm.reshape(()), residual(name, a, x, b), rtol=1e-10, atol=0)
        assert residual(name, a, x, b) > 1e-12 * torch.linalg.vector_norm(b)


def test_dense_failure_is_reported():
    indefinite, b = make_matrix("sym"), rand(N)
    sol = solvers.cholesky(lambda x: indefinite @ x, b)
    assert not bool(sol.converged)
    singular = make_matrix("gen")
    singular[:, 0] = 0.0
    sol = solvers.lu(lambda x: singular @ x, b)
    assert not bool(sol.converged)
    f = solvers.factorize(lambda x: singular @ x, like=b)
    assert f.info > 0 and not bool(f.solve(b).converged)


def test_breakdown_is_reported_not_nan():
    # a rotation: <p, A p> = 0 breaks CG down, <rhat, A p> = 0 breaks BiCGStab down; both stall
    # at x = 0 with finite values and report it
    rotation = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=F64)
    b = torch.tensor([1.0, 0.0], dtype=F64)
    for name in ["cg", "bicgstab"]:
        for sol in (
            run(name, rotation, b, max_iter=5),
            functx.vmap(lambda b: run(name, rotation, b, max_iter=5))(b[None]),
        ):
            assert torch.equal(sol.value.reshape(2), torch.zeros(2, dtype=F64)), name
            assert float(sol.residual_norm.reshape(())) == 1.0 and not bool(sol.converged.reshape(()))
            assert int(sol.num_steps.reshape(())) == 5


@pytest.mark.parametrize("name", ALL)
def test_zero_right_hand_side_no_nan_in_values_or_gradients(name):
    a, zero = make_matrix(KIND[name]), torch.zeros(N, dtype=F64)
    sol = run(name, a, zero)
    assert torch.equal(sol.value, zero) and bool(sol.converged) and sol.residual_norm == 0
    if name in ITERATIVE:
        assert sol.num_steps == 0

    def loss(m):  # masked path (a transform is active): every lane frozen from the start
        s = run(name, m, zero)
        return (s.value**2).sum() + s.residual_norm

    g = functx.grad(loss)(a)
    assert torch.equal(g, torch.zeros_like(a))


# ---------------------------------------------------------------------------------------
# Differentiating through the iterations (grad, jvp, vmap(grad)) w.r.t. the matrix entries


def _sym(m: torch.Tensor) -> torch.Tensor:
    return (m + m.mT) / 2


@pytest.mark.parametrize("name", ALL)
def test_grad_through_solver_wrt_matrix(name):
    a, b, w = make_matrix(KIND[name]), rand(N), rand(N, seed=7)
    param = _sym if name in SYMMETRIC else (lambda m: m)

    def loss(m, solve):
        return (w * solve(param(m))).sum()

    got = functx.grad(lambda m: loss(m, lambda p: run(name, p, b).value))(a)
    want = torch.func.grad(lambda m: loss(m, lambda p: reference(name, p, b)))(a)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", ["cg", "gmres", "lu"])
def test_jvp_and_vmap_of_grad_through_solver(name):
    a, b, t = make_matrix(KIND[name]), rand(N), _sym(rand(N, N, seed=3))
    _, tangent = functx.jvp(lambda m: run(name, m, b).value, (a,), (t,))
    torch.testing.assert_close(tangent, -torch.linalg.solve(a, t @ torch.linalg.solve(a, b)), rtol=1e-8, atol=1e-10)
    bs = rand(3, N, seed=4)
    grads = functx.vmap(functx.grad(lambda m, b: run(name, _sym(m), b).value.sum()), in_dims=(None, 0))(a, bs)
    want = torch.vmap(torch.func.grad(lambda m, b: torch.linalg.solve(_sym(m), b).sum()), in_dims=(None, 0))(a, bs)
    torch.testing.assert_close(grads, want, rtol=1e-7, atol=1e-9)


# ---------------------------------------------------------------------------------------
# Ridge, preconditioners, least squares, complex, pytrees


@pytest.mark.parametrize("name", ALL)
def test_ridge_float_and_differentiable_tensor(name):
    a, b = make_matrix(KIND[name]), rand(N)
    sol = run(name, a, b, ridge=0.5)
    torch.testing.assert_close(sol.value, reference(name, a, b, ridge=0.5), rtol=1e-10, atol=1e-10)
    # d x / d ridge = -(A + ridge I)^{-1} x (normal equations: -(A^T A + ridge I)^{-1} x)
    lam = torch.tensor(0.5, dtype=F64)
    got = functx.grad(lambda lam: run(name, a, b, ridge=lam).value.sum())(lam)
    x = reference(name, a, b, ridge=0.5)
    op = a.mT @ a if name == "normal_cg" else a
    want = -torch.linalg.solve(op + 0.5 * torch.eye(N, dtype=F64), x).sum()
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)


def test_minres_negative_ridge_shift():
    a, b = make_matrix("spd"), rand(N)
    sol = solvers.minres(lambda x: a @ x, b, ridge=-2.5)  # shifted into the spectrum: indefinite
    torch.testing.assert_close(sol.value, reference("minres", a, b, ridge=-2.5), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["cg", "minres", "gmres", "bicgstab"])
def test_jacobi_preconditioner(name):
    d = torch.logspace(0, 4, 40, dtype=F64)
    a = torch.diag(d) + 0.1 * torch.ones(40, 40, dtype=F64)  # SPD, badly scaled
    b = rand(40)
    plain = run(name, a, b, max_iter=60)
    pre = run(name, a, b, max_iter=60, preconditioner=lambda r: r / torch.diagonal(a))
    assert bool(pre.converged) and not bool(plain.converged)  # the same budget
    assert relative_error(pre.value, torch.linalg.solve(a, b)) < 1e-10


def test_normal_cg_least_squares():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(20, 6, dtype=F64, generator=gen)
    y = torch.randn(20, dtype=F64, generator=gen)
    ref = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
    # the solution space from x0, or from rmatvec; the adjoint from functx.vjp or from rmatvec
    a = solvers.normal_cg(lambda w: X @ w, y, x0=torch.zeros(6, dtype=F64))
    b = solvers.normal_cg(lambda w: X @ w, y, rmatvec=lambda r: X.T @ r)
    c = solvers.normal_cg(lambda p: {"out": X @ p["w"]}, {"out": y}, x0={"w": torch.zeros(6, dtype=F64)})
    for sol in (a, b):
        torch.testing.assert_close(sol.value, ref, rtol=1e-10, atol=1e-12)
        assert bool(sol.converged)
        torch.testing.assert_close(
            sol.residual_norm, torch.linalg.vector_norm(X.T @ (y - X @ sol.value)), rtol=1e-6, atol=1e-13
        )
    torch.testing.assert_close(c.value["w"], ref, rtol=1e-10, atol=1e-12)
    # ridge regression
    sol = solvers.normal_cg(lambda w: X @ w, y, rmatvec=lambda r: X.T @ r, ridge=2.0)
    torch.testing.assert_close(sol.value, torch.linalg.solve(X.T @ X + 2 * torch.eye(6, dtype=F64), X.T @ y))
    # rank deficient + ridge: still solvable
    Xd = torch.cat([X, X[:, :1]], dim=1)
    sol = solvers.normal_cg(lambda w: Xd @ w, y, x0=torch.zeros(7, dtype=F64), ridge=1e-3)
    torch.testing.assert_close(sol.value, torch.linalg.solve(Xd.T @ Xd + 1e-3 * torch.eye(7, dtype=F64), Xd.T @ y))


@pytest.mark.parametrize("name", ALL)
def test_complex_hermitian_or_general(name):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(8, 8, dtype=torch.complex128, generator=gen)
    if KIND[name] == "spd":
        a = z @ z.mH / 8 + torch.eye(8, dtype=torch.complex128)
    elif KIND[name] == "sym":
        a = (z + z.mH) / 2
    else:
        a = 2 * torch.eye(8, dtype=torch.complex128) + 0.3 * z
    b = torch.randn(8, dtype=torch.complex128, generator=gen)
    sol = run(name, a, b)
    ref = torch.linalg.solve(a.mH @ a, a.mH @ b) if name == "normal_cg" else torch.linalg.solve(a, b)
    assert bool(sol.converged) and sol.residual_norm.dtype == F64
    torch.testing.assert_close(sol.value, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", list(tree_catalogue()))
def test_tree_catalogue(kind):
    b = tree_catalogue()[kind]
    scales = [2.0 + k for k in range(len(tree_leaves(b)))]

    def matvec(x):  # a different positive scaling per leaf
        leaves = iter(scales)
        return tree_map(lambda t: next(leaves) * t, x)

    sol = solvers.cg(matvec, b)
    leaves = iter(scales)
    assert_tree_allclose(sol.value, tree_map(lambda t: t / next(leaves), b), rtol=1e-12, atol=1e-12)


def test_mixed_dtype_leaves_are_promoted_and_restored():
    b = {"a": torch.tensor([1.0, 2.0], dtype=F32), "b": torch.tensor([4.0], dtype=F64)}
    sol = solvers.gmres(lambda x: {"a": 2 * x["a"], "b": 4 * x["b"]}, b)
    assert sol.value["a"].dtype == F32 and sol.value["b"].dtype == F64
    torch.testing.assert_close(sol.value["a"], torch.tensor([0.5, 1.0], dtype=F32))


def test_inputs_are_not_mutated():
    a, b = make_matrix("gen"), rand(N)
    x0 = torch.zeros(N, dtype=F64)
    solvers.normal_cg(lambda x: a @ x, b, x0=x0)
    assert not b.requires_grad and not x0.requires_grad and torch.equal(x0, torch.zeros(N, dtype=F64))


# ---------------------------------------------------------------------------------------
# factorize and solve


def test_factorize_reuse_adjoint_and_vmap():
    a, bs = make_matrix("gen"), rand(4, N)
    f = solvers.factorize(tree_operator(a), like=to_tree(bs[0]))
    for b in bs:
        torch.testing.assert_close(to_vec(f.solve(to_tree(b)).value), torch.linalg.solve(a, b))
        adj = f.solve(to_tree(b), adjoint=True)
        torch.testing.assert_close(to_vec(adj.value), torch.linalg.solve(a.T, b))
        assert bool(adj.converged)
    torch.testing.assert_close(f.matrix, a, rtol=0, atol=1e-15)  # materialised exactly
    s = make_matrix("spd")
    fc = solvers.factorize(lambda x: s @ x, like=bs[0], method="cholesky", ridge=1.0)
    torch.testing.assert_close(
        torch.vmap(lambda b: fc.solve(b).value)(bs), torch.linalg.solve(s + torch.eye(N, dtype=F64), bs.T).T
    )
    # a Factorization is a pytree: functx.vmap may return one
    mats = torch.stack([a, 2 * a])
    fs = functx.vmap(lambda m: solvers.factorize(lambda x: m @ x, like=bs[0]))(mats)
    assert isinstance(fs, solvers.Factorization) and fs.factors.shape == (2, N, N)
    xs = functx.vmap(lambda f: f.solve(bs[0]).value)(fs)
    torch.testing.assert_close(xs, torch.linalg.solve(mats, bs[0]))


def test_grad_through_factorize():
    a, b = make_matrix("gen"), rand(N)
    got = functx.grad(lambda m: solvers.factorize(lambda x: m @ x, like=b).solve(b, adjoint=True).value.sum())(a)
    want = torch.func.grad(lambda m: torch.linalg.solve(m.T, b).sum())(a)
    torch.testing.assert_close(got, want)


def test_solve_dispatch():
    spd, sym, gen, b = make_matrix("spd"), make_matrix("sym"), make_matrix("gen"), rand(N)
    cases = [({"positive_definite": True}, spd, "cg"), ({"symmetric": True}, sym, "minres"), ({}, gen, "gmres")]
    for flags, a, name in cases:
        got = solvers.solve(lambda x: a @ x, b, **flags)
        want = run(name, a, b)
        assert torch.equal(got.value, want.value) and got.num_steps == want.num_steps
    for name in ALL:
        sol = solvers.solve(lambda x: gen @ x if KIND[name] == "gen" else spd @ x, b, method=name, rtol=1e-11)
        assert bool(sol.converged)
    sol = solvers.solve(lambda x: gen @ x, b, method="gmres", restart=5, max_iter=3)
    assert sol.num_steps == 3


def test_compiles_fullgraph():
    a, b = make_matrix("spd", n=6), rand(6)
    compiled = torch.compile(lambda a, b: tuple(solvers.cg(lambda x: a @ x, b, max_iter=8)), fullgraph=True)
    x, iterations, _, converged = compiled(a, b)
    torch.testing.assert_close(x, torch.linalg.solve(a, b))
    assert 0 < iterations <= 8 and bool(converged)


@pytest.mark.parametrize("method", ["cg", "minres", "gmres", "bicgstab", "normal_cg", "lu", "cholesky"])
def test_every_solver_compiles_fullgraph_at_small_max_iter(method):
    # compile time grows with max_iter (a fixed trip count under compile): keep it small here
    a, b = make_matrix("spd", n=5), rand(5)
    options = {} if method in ("lu", "cholesky") else {"max_iter": 4}
    solve = lambda a, b: tuple(solvers.solve(lambda x: a @ x, b, method=method, **options))
    torch._dynamo.reset()
    x, iterations, residual, converged = torch.compile(solve, fullgraph=True)(a, b)
    x_eager, iterations_eager, _, converged_eager = solve(a, b)
    torch.testing.assert_close(x, x_eager, rtol=1e-9, atol=1e-12)
    assert int(iterations) == int(iterations_eager) and bool(converged) == bool(converged_eager)
    if method in ("lu", "cholesky"):
        torch.testing.assert_close(x, torch.linalg.solve(a, b))


# ---------------------------------------------------------------------------------------
# Errors


def _a(n: int = 3) -> torch.Tensor:
    return torch.eye(n, dtype=F64)


MV = lambda x: x
B3 = torch.ones(3, dtype=F64)

ERRORS = [
    (lambda: solvers.cg(None, B3), TypeError, "`functx.solvers.cg`: `matvec` must be callable"),
    (lambda: solvers.cg(MV, {}), ValueError, "`b` must contain at least one tensor"),
    (lambda: solvers.cg(MV, torch.ones(3, dtype=torch.int64)), TypeError, "b must be a floating-point"),
    (lambda: solvers.cg(MV, {"w": B3, "n": 3}), TypeError, "b['n'] must be a floating-point"),
    (lambda: solvers.cg(MV, B3, x0=(B3,)), ValueError, "`x0` must have the same tree structure as `b`"),
    (
        lambda: solvers.cg(MV, B3, x0=torch.ones(4, dtype=F64)),
        ValueError,
        "x0 has shape (4,) but the corresponding leaf of `b` has shape (3,)",
    ),
    (lambda: solvers.cg(MV, B3, x0=torch.ones(3)), TypeError, "has dtype torch.float32"),
    (lambda: solvers.cg(MV, B3, rtol=-1.0), ValueError, "`functx.solvers.cg`: `rtol` must be non-negative, got -1.0."),
    (lambda: solvers.cg(MV, B3, atol="0"), TypeError, "`atol` must be None or a non-negative float"),
    (lambda: solvers.minres(MV, B3, max_iter=-1), ValueError, "`max_iter` must be an int >= 0"),
    (lambda: solvers.bicgstab(MV, B3, max_iter=2.0), TypeError, "`max_iter` must be an int"),
    (lambda: solvers.cg(MV, B3, preconditioner=1), TypeError, "`preconditioner` must be None or a callable"),
    (lambda: solvers.cg(MV, B3, ridge=torch.ones(3)), ValueError, "`ridge` must be a number or a 0-d tensor"),
    (lambda: solvers.cg(MV, B3, ridge="1"), TypeError, "`ridge` must be None, a float"),
    (lambda: solvers.cg(MV, B3, ridge=float("inf")), ValueError, "`ridge` must be finite"),
    (lambda: solvers.gmres(MV, B3, restart=0), ValueError, "`functx.solvers.gmres`: `restart` must be an int >= 1"),
    (
        lambda: solvers.cg(lambda x: {"y": x}, B3),
        ValueError,
        "the output of `matvec` must have the same tree structure as `b`",
    ),
    (
        lambda: solvers.gmres(lambda x: x[:2], B3),
        ValueError,
        "matvec(x) has shape (2,) but the corresponding leaf of `b`",
    ),
    (lambda: solvers.bicgstab(lambda x: x.float(), B3), TypeError, "cast it with `.to(torch.float64)`"),
    (lambda: solvers.cg(MV, B3, preconditioner=lambda r: r[:1]), ValueError, "preconditioner(r) has shape (1,)"),
    (lambda: solvers.normal_cg(MV, B3, rmatvec=3), TypeError, "`functx.solvers.normal_cg`: `rmatvec` must be None"),
    (lambda: solvers.lu(MV, B3, x0=torch.ones(2, dtype=F64)), ValueError, "`functx.solvers.lu`: x0"),
    (lambda: solvers.factorize(MV, B3, method="qr"), ValueError, "`method` must be one of ['lu', 'cholesky']"),
    (lambda: solvers.factorize(MV, B3).solve(B3, adjoint=1), TypeError, "`adjoint` must be a bool"),
    (
        lambda: solvers.factorize(MV, B3).solve(torch.ones(2, dtype=F64)),
        ValueError,
        "Factorization.solve`: b has shape (2,)",
    ),
    (lambda: solvers.solve(MV, B3, method="svd"), ValueError, "`functx.solvers.solve`: `method` must be one of"),
    (
        lambda: solvers.solve(MV, B3, method="lu", max_iter=3),
        TypeError,
        "method 'lu' does not accept option(s) ['max_iter']",
    ),
    (lambda: solvers.solve(MV, B3, symmetric=1), TypeError, "`symmetric` must be a bool"),
]


@pytest.mark.parametrize("call, exc, fragment", ERRORS, ids=[e[2][:40] for e in ERRORS])
def test_errors(call, exc, fragment):
    with pytest.raises(exc, match=re.escape(fragment)):
        call()


# ---------------------------------------------------------------------------------------
# One failure vocabulary: throw, NonConvergenceError, Solution.num_steps (issue 14)


def _hard(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    a = make_matrix(KIND[name], cond=1e6)
    return a, torch.linspace(1.0, 2.0, N, dtype=F64)


@pytest.mark.parametrize("name", ITERATIVE)
def test_throw_raises_nonconvergence_error_with_stats(name):
    a, b = _hard(name)
    fn = getattr(solvers, name)
    quiet = fn(lambda x: a @ x, b, max_iter=2)  # throw=False (default): reported in `converged` only
    assert not bool(quiet.converged) and int(quiet.num_steps) == 2
    with pytest.raises(functx.NonConvergenceError, match=rf"`functx.solvers.{name}`: did not converge") as info:
        fn(lambda x: a @ x, b, max_iter=2, throw=True)
    err = info.value
    assert err.api == f"functx.solvers.{name}" and isinstance(err, RuntimeError)
    assert err.stats["converged"] is False and err.stats["num_steps"] == 2 and err.stats["max_iter"] == 2
    # every product with the operator: one per step (two for bicgstab; A and A^H for normal_cg),
    # plus the start and the final residual, plus a restart residual for gmres
    per_step = {"cg": 1, "minres": 1, "gmres": 1, "bicgstab": 2, "normal_cg": 2}[name]
    assert 2 * per_step <= err.stats["num_matvecs"] <= 2 * per_step + 4, err.stats
    assert math.isclose(err.stats["residual_norm"], float(quiet.residual_norm), rel_tol=1e-9)
    # converged: throw=True returns the same Solution
    ok = fn(lambda x: a @ x, b, max_iter=10 * N, rtol=1e-6, throw=True)
    assert bool(ok.converged)
    # solve() forwards throw to the chosen solver
    with pytest.raises(functx.NonConvergenceError):
        solvers.solve(lambda x: a @ x, b, method=name, max_iter=2, throw=True)
    with pytest.raises(TypeError, match=rf"`functx.solvers.{name}`: `throw` must be a bool, got 1"):
        fn(lambda x: a @ x, b, throw=1)


@pytest.mark.parametrize("name", DENSE)
def test_throw_dense_singular(name):
    singular = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=F64)
    b = torch.ones(2, dtype=F64)
    assert not bool(getattr(solvers, name)(lambda x: singular @ x, b).converged)
    with pytest.raises(functx.NonConvergenceError, match=rf"`functx.solvers.{name}`: did not converge") as info:
        getattr(solvers, name)(lambda x: singular @ x, b, throw=True)
    assert info.value.stats["num_steps"] == 0
    f = solvers.factorize(lambda x: singular @ x, like=b, method=name)
    with pytest.raises(functx.NonConvergenceError, match=r"`functx.solvers.Factorization.solve`"):
        f.solve(b, throw=True)


def test_throw_under_vmap_reads_every_lane():
    a = make_matrix("spd", cond=1e6)
    bs = torch.stack([torch.zeros(N, dtype=F64), torch.linspace(1.0, 2.0, N, dtype=F64)])
    run = lambda b: solvers.cg(lambda x: a @ x, b, max_iter=2, throw=True).value
    with pytest.raises(functx.NonConvergenceError, match=r"did not converge"):
        functx.vmap(run)(bs)  # lane 0 (b = 0) converges, lane 1 does not
    functx.vmap(run)(bs[:1])  # every lane converged: no error


def test_iterations_is_a_deprecated_alias_of_num_steps():
    a = make_matrix("spd")
    sol = solvers.cg(lambda x: a @ x, torch.ones(N, dtype=F64))
    with pytest.warns(FutureWarning, match=r"Solution.iterations` is deprecated.*`Solution.num_steps`"):
        steps = sol.iterations
    assert steps is sol.num_steps and sol._fields == ("value", "num_steps", "residual_norm", "converged")


# ---------------------------------------------------------------------------------------
# User callables never receive the caller's tensors (issue 15, defect 6); dtype errors named


def _storages(tree) -> set[int]:
    return {leaf.untyped_storage().data_ptr() for leaf in tree_leaves(tree)}


@pytest.mark.parametrize("name", ITERATIVE + DENSE)
@pytest.mark.parametrize("structure", ["tensor", "tree"])
def test_callables_never_see_caller_storage(name, structure):
    a = make_matrix(KIND[name])
    b = torch.linspace(1.0, 2.0, N, dtype=F64)
    x0 = torch.zeros(N, dtype=F64)
    if structure == "tree":
        b, x0 = {"u": b}, {"u": x0}
    unwrap = (lambda t: t["u"]) if structure == "tree" else (lambda t: t)
    wrap = (lambda t: {"u": t}) if structure == "tree" else (lambda t: t)
    caller = _storages(b) | _storages(x0)
    seen: list[set[int]] = []

    def spy(op):
        def apply(v):
            seen.append(_storages(unwrap_all(unwrap(v))))  # the dense solvers vmap the matvec
            return wrap(op @ unwrap(v))

        return apply

    kwargs = {} if name in DENSE else {"x0": x0, "preconditioner": spy(torch.eye(N, dtype=F64))}
    if name == "normal_cg":
        kwargs["rmatvec"] = spy(a.T)
    before = tree_map(torch.clone, b)
    sol = getattr(solvers, name)(spy(a), b, **kwargs)
    assert seen and not any(s & caller for s in seen)
    assert_tree_allclose(b, before, rtol=0, atol=0)
    want = (
        torch.linalg.lstsq(a, unwrap(b)[:, None]).solution[:, 0]
        if name == "normal_cg"
        else torch.linalg.solve(a, unwrap(b))
    )
    torch.testing.assert_close(unwrap(sol.value), want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", ITERATIVE)
@pytest.mark.parametrize("where", ["matvec", "preconditioner"])
def test_in_place_write_by_a_callable_is_refused(name, where):
    """A callable that writes its argument (`r.mul_(0.5)`) would corrupt the iterates (cg
    reported converged=True with a wrong x): refused, and the caller's b is untouched."""
    a = make_matrix(KIND[name])
    b = torch.linspace(1.0, 2.0, N, dtype=F64)
    before = b.clone()

    def writes(v):
        out = a @ v if where == "matvec" else v.clone()
        v.mul_(0.5)
        return out

    mv, pre = (writes, None) if where == "matvec" else ((lambda x: a @ x), writes)
    extra = {"rmatvec": lambda y: a.T @ y} if name == "normal_cg" else {}
    with pytest.raises(ValueError, match=rf"`functx.solvers.{name}`: `{where}` wrote its argument `\w+` in place"):
        getattr(solvers, name)(mv, b, preconditioner=pre, **extra)
    assert torch.equal(b, before)


@pytest.mark.parametrize("name", ALL)
def test_operator_dtype_mismatch_is_named(name):
    a32 = make_matrix(KIND[name], dtype=F32)
    b = torch.ones(N, dtype=F64)
    with pytest.raises(
        TypeError, match=rf"`functx.solvers.{name}`: `matvec` failed on `x`.*dtype torch.float64.*another dtype"
    ):
        getattr(solvers, name)(lambda x: a32 @ x, b)


# ---------------------------------------------------------------------------------------
# Early exit under transforms (the statement of docs/solvers.md, measured)


@pytest.mark.parametrize("name", ITERATIVE)
@pytest.mark.parametrize(
    "transform",
    ["functx.vmap", "torch.vmap", "functx.grad", "torch.func.jvp", "functx.vmap(functx.grad)"],
)
def test_solvers_stop_early_under_vmap_and_grad(name, transform):
    """In eager mode the iterative solvers stop once every lane has converged, under vmap,
    grad and jvp too: they call matvec as often as the plain eager solve, far fewer times
    than max_iter. (The fixed trip count of max_iter is paid only under torch.compile.)"""
    a, b = make_matrix(KIND[name]), torch.linspace(1.0, 2.0, N, dtype=F64)
    calls = [0]

    def mv(x):
        calls[0] += 1
        return a @ x

    solve = lambda bb: getattr(solvers, name)(mv, bb, max_iter=500).value
    solve(b)
    eager, calls[0] = calls[0], 0
    bs = torch.stack([b, 2 * b])
    run = {
        "functx.vmap": lambda: functx.vmap(solve)(bs),
        "torch.vmap": lambda: torch.vmap(solve)(bs),
        "functx.grad": lambda: functx.grad(lambda bb: solve(bb).sum())(b),
        "torch.func.jvp": lambda: torch.func.jvp(solve, (b,), (b,)),
        "functx.vmap(functx.grad)": lambda: functx.vmap(functx.grad(lambda bb: solve(bb).sum()))(bs),
    }[transform]
    run()
    assert eager < 100 and calls[0] <= eager + 2  # not max_iter = 500


def test_torch_internals_unsure_answers_are_explicit():
    """`transforms_active` answers True when unsure (take the safe path), `transforms_detected`
    False (nothing to peel); without the internals, throw=True is still honoured in eager mode
    and under grad, and the fallback solvers give the same numbers."""
    from functx import _torch_internals as ti

    a = make_matrix("spd", cond=1e6)
    b = torch.linspace(1.0, 2.0, N, dtype=F64)
    assert not ti.transforms_active() and not ti.transforms_detected()
    seen = []
    torch.func.grad(lambda t: seen.append((ti.transforms_active(), ti.transforms_detected())) or t.sum())(b)
    assert seen == [(True, True)] and ti.transform_levels() == []
    want = solvers.cg(lambda x: a @ x, b, max_iter=3)
    with ti.switched_off():
        assert ti.transforms_active() and not ti.transforms_detected() and not ti.rule_internals_available()
        got = solvers.cg(lambda x: a @ x, b, max_iter=3)
        with pytest.raises(functx.NonConvergenceError):
            solvers.cg(lambda x: a @ x, b, max_iter=3, throw=True)
        with pytest.raises(functx.NonConvergenceError):
            functx.grad(lambda bb: solvers.cg(lambda x: a @ x, bb, max_iter=3, throw=True).value.sum())(b)
        batched = functx.vmap(lambda bb: solvers.cg(lambda x: a @ x, bb, max_iter=3).value)(b[None])
    torch.testing.assert_close(got.value, want.value)
    torch.testing.assert_close(batched[0], want.value)
    assert int(got.num_steps) == int(want.num_steps) == 3


@pytest.mark.parametrize("name", ALL)
def test_solvers_under_inference_mode(name):
    """The in-place check reads version counters, which inference tensors lack: skipped there."""
    a = make_matrix(KIND[name])
    want = getattr(solvers, name)(lambda x: a @ x, torch.linspace(1.0, 2.0, N, dtype=F64))
    with torch.inference_mode():
        b = torch.linspace(1.0, 2.0, N, dtype=F64)
        got = getattr(solvers, name)(lambda x: a @ x, b, throw=True)
    outside = getattr(solvers, name)(lambda x: a @ x, b)  # an inference tensor used outside the mode
    torch.testing.assert_close(got.value, want.value)
    torch.testing.assert_close(outside.value, want.value)
