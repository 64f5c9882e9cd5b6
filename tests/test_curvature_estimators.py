"""Estimators of functx.curvature (eigsh, trace, diagonal, spectral_density) on dense test operators.

Every result is checked against float64 dense linear algebra (torch.linalg.eigvalsh, the exact trace
and diagonal). Randomised estimators are tested by exact identities, by exactness where it is provable
(low rank, num_matvecs >= P) and statistically through their mean over many seeds, with tolerances of
at least 6 standard errors (a failure by chance is below 1e-6 for any seed).
"""

import math
import warnings

import pytest
import torch

import functx
from functx._curvature import _estimators as est

DT = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # thousands of products of tiny matrices: intra-op threads only add contention on a shared machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class DenseOp:
    """The operator protocol around a symmetric matrix; counts products and the largest block."""

    def __init__(self, matrix, shapes=None):
        self.matrix = matrix
        self.shape = tuple(matrix.shape)
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.shapes = shapes
        self.calls = 0
        self.matvecs = 0
        self.widest = 0

    def __matmul__(self, v):
        self.calls += 1
        width = 1 if v.ndim == 1 else v.shape[1]
        self.matvecs += width
        self.widest = max(self.widest, width)
        return self.matrix @ v

    def unflatten(self, flat):
        out, start = {}, 0
        for name, shape in self.shapes.items():
            size = math.prod(shape)
            out[name] = flat[start : start + size].reshape(shape)
            start += size
        return out


def rotated(eigenvalues, seed=0):
    """A symmetric matrix with the given eigenvalues and Haar-random eigenvectors."""
    g = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    Q = Q * torch.sign(torch.diagonal(R))
    A = (Q * torch.as_tensor(eigenvalues, dtype=DT)) @ Q.T
    return (A + A.T) / 2


def low_rank(n, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, rank, generator=g, dtype=DT)
    return B @ B.T


def reference(A, k, which):
    values = torch.linalg.eigvalsh(A)
    if which == "LA":
        return values[-k:]
    if which == "SA":
        return values[:k]
    return values[torch.argsort(values.abs(), descending=True)[:k]].sort().values


def check_pairs(A, values, vectors, expected, atol):
    scale = torch.linalg.matrix_norm(A, 2)
    torch.testing.assert_close(values, expected, rtol=0, atol=atol * scale)
    assert torch.all(values[1:] >= values[:-1])  # ascending
    k = len(values)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(k, dtype=A.dtype), rtol=0, atol=1e-8)
    residual = torch.linalg.vector_norm(A @ vectors - vectors * values, dim=0)
    assert residual.max() <= 1e-7 * scale


# ---------------------------------------------------------------------------------------------- eigsh

SPECTRA = {
    "indefinite": torch.linspace(-4.0, 9.0, 150),
    "hessian-like": torch.cat(
        [torch.tensor([40.0, 25.0, 12.0, -6.0]), 0.3 * torch.randn(146, generator=torch.Generator().manual_seed(3))]
    ),
    "negative-dominant": torch.cat([torch.tensor([-30.0, -20.0, 15.0]), torch.linspace(-2.0, 2.0, 117)]),
    "decaying": 0.9 ** torch.arange(120.0),
}


@pytest.mark.parametrize("spectrum", list(SPECTRA))
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
@pytest.mark.parametrize("k", [1, 3])
def test_eigsh_matches_eigvalsh(spectrum, which, k):
    if spectrum == "decaying" and which == "SA":
        pytest.skip("the bottom of 0.9**i is a cluster of relative width 1e-6: thousands of products")
    A = rotated(SPECTRA[spectrum].tolist())
    values, vectors, info = est.eigsh(DenseOp(A), k=k, which=which, tol=1e-12, return_info=True)
    assert info.converged and info.method == "lanczos"
    check_pairs(A, values, vectors, reference(A, k, which), atol=1e-10)


@pytest.mark.parametrize("spectrum", ["indefinite", "negative-dominant"])
@pytest.mark.parametrize(("k", "block_size"), [(1, None), (3, None), (3, 1)])
@pytest.mark.parametrize("tol", [1e-6, 1e-10])
def test_eigsh_reported_residuals_are_the_true_ones(spectrum, k, block_size, tol):
    # convergence is read off the Lanczos relation: it must equal ||A x - lambda x|| computed directly
    A = rotated(SPECTRA[spectrum].tolist())
    values, vectors, info = est.eigsh(A, k=k, tol=tol, block_size=block_size, return_info=True)
    true = torch.linalg.vector_norm(A @ vectors - vectors * values, dim=0)
    scale = float(torch.linalg.matrix_norm(A, 2))
    torch.testing.assert_close(info.residual_norms, true, rtol=0, atol=1e-13 * scale)
    assert info.converged and true.max() <= info.threshold + 1e-13 * scale
    # ||A|| is estimated from below by the extreme Ritz value, which converges first
    assert 0.999 * tol * scale <= info.threshold <= tol * scale * (1 + 1e-12)


def test_eigsh_default_tolerance_float64_is_1e_10_accurate():
    A = rotated(SPECTRA["indefinite"].tolist(), seed=1)
    values, vectors = est.eigsh(A, k=2)
    check_pairs(A, values, vectors, reference(A, 2, "LA"), atol=1e-10)


@pytest.mark.parametrize("multiplicity", [2, 3])
def test_eigsh_degenerate_eigenvalues_keep_every_copy(multiplicity):
    # a single-vector Krylov space holds one copy of a repeated eigenvalue; the default block (k) holds k
    spectrum = [5.0] * multiplicity + [4.0] + torch.linspace(0.0, 3.0, 96).tolist()
    A = rotated(spectrum, seed=2)
    values, vectors = est.eigsh(A, k=3)
    check_pairs(A, values, vectors, reference(A, 3, "LA"), atol=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_eigsh_few_distinct_eigenvalues_exhaust_the_block_krylov_space(seed):
    # 7 distinct eigenvalues of multiplicity ~5: the block Krylov space becomes invariant after a
    # few steps and the iteration continues from fresh random directions (a regression: a
    # direction with a residual just above rounding level once broke the basis' orthogonality)
    g = torch.Generator().manual_seed(seed)
    A = rotated(torch.randint(-3, 4, (32,), generator=g).tolist(), seed=seed)
    for which in ("LA", "SA"):
        values, vectors, info = est.eigsh(A, k=2, which=which, return_info=True)
        assert info.converged
        check_pairs(A, values, vectors, reference(A, 2, which), atol=1e-10)


def test_eigsh_clustered_eigenvalues():
    spectrum = [3.0, 3.0 + 1e-7, 3.0 + 2e-7, 2.0] + torch.linspace(-1.0, 1.0, 96).tolist()
    A = rotated(spectrum, seed=4)
    for block_size in (1, 3):
        values, vectors = est.eigsh(A, k=3, block_size=block_size, tol=1e-12)
        check_pairs(A, values, vectors, reference(A, 3, "LA"), atol=1e-10)


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_eigsh_low_rank_operator_exhausts_its_krylov_space(which):
    # rank 4 of 80: the Krylov space becomes invariant; SA asks for copies of the zero eigenvalue
    A = low_rank(80, 4)
    values, vectors, info = est.eigsh(A, k=3, which=which, return_info=True)
    assert info.converged
    check_pairs(A, values, vectors, reference(A, 3, which), atol=1e-10)


def test_eigsh_zero_operator():
    values, vectors, info = est.eigsh(torch.zeros(60, 60, dtype=DT), k=2, return_info=True)
    assert info.converged
    torch.testing.assert_close(values, torch.zeros(2, dtype=DT))
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(2, dtype=DT))


@pytest.mark.parametrize(("size", "k"), [(5, 5), (7, 4), (30, 6), (40, 29)])
def test_eigsh_small_or_large_k_goes_dense(size, k):
    A = rotated(torch.linspace(-1.0, 2.0, size).tolist(), seed=size)
    op = DenseOp(A)
    for which in ("LA", "SA", "LM"):
        values, vectors, info = est.eigsh(op, k=k, which=which, return_info=True)
        assert info.method == "dense" and info.num_matvecs == size and info.num_steps == 1
        check_pairs(A, values, vectors, reference(A, k, which), atol=1e-12)


def test_eigsh_reports_every_product():
    A = rotated(SPECTRA["hessian-like"].tolist())
    for k, block_size in [(1, None), (3, None), (3, 1)]:
        op = DenseOp(A)
        *_, info = est.eigsh(op, k=k, block_size=block_size, return_info=True)
        assert info.num_matvecs == op.matvecs
        assert op.widest == (block_size or k)  # blocks go to the operator as one (P, K) product
        assert op.calls == op.matvecs // op.widest == info.num_steps


def test_eigsh_float32():
    A64 = rotated(SPECTRA["hessian-like"].tolist(), seed=5)
    values, vectors, info = est.eigsh(A64.float(), k=3, return_info=True)
    assert values.dtype == vectors.dtype == torch.float32 and info.converged
    torch.testing.assert_close(values.double(), reference(A64, 3, "LA"), rtol=1e-4, atol=1e-4)


def test_eigsh_not_converged_warns_or_raises():
    A = rotated(SPECTRA["indefinite"].tolist())
    with pytest.warns(functx.NonConvergenceWarning, match=r"`functx.curvature.eigsh`: not converged after \d+ matvecs"):
        values, _ = est.eigsh(A, k=1, max_matvecs=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with return_info the caller reads info.converged: no warning
        *_, info = est.eigsh(A, k=1, max_matvecs=8, return_info=True)
    assert not info.converged and info.num_matvecs <= 8 and info.residual_norms.max() > info.threshold
    assert info.num_steps == info.num_matvecs  # block size 1: one vector per step
    with pytest.raises(
        functx.NonConvergenceError, match=r"eigsh`: not converged after \d+ matvecs \(max_matvecs=8\)"
    ) as caught:
        est.eigsh(A, k=1, max_matvecs=8, throw=True)
    error = caught.value
    assert isinstance(error, RuntimeError) and error.api == "functx.curvature.eigsh"
    assert error.stats["converged"] is False and error.stats["num_matvecs"] == info.num_matvecs
    assert error.stats["num_steps"] == info.num_steps
    torch.testing.assert_close(error.stats["residual_norms"], info.residual_norms)


def test_eigsh_max_iter_is_a_deprecated_alias_of_max_matvecs():
    A = rotated(SPECTRA["indefinite"].tolist())
    expected = est.eigsh(A, k=1, max_matvecs=8, return_info=True)
    with pytest.warns(FutureWarning, match=r"`functx.curvature.eigsh\(max_iter=\)` is deprecated.*max_matvecs"):
        got = est.eigsh(A, k=1, max_iter=8, return_info=True)
    assert torch.equal(got[0], expected[0]) and got[2].num_matvecs == expected[2].num_matvecs
    with pytest.raises(ValueError, match=r"`max_iter` \(deprecated\) and `max_matvecs` must not both be given"):
        est.eigsh(A, k=1, max_iter=8, max_matvecs=8)
    with pytest.warns(FutureWarning, match=r"`functx.curvature.EigshInfo.matvecs` is deprecated.*num_matvecs"):
        assert expected[2].matvecs == expected[2].num_matvecs
    with pytest.warns(FutureWarning, match=r"`functx.curvature.EigshInfo.restarts` is deprecated.*num_restarts"):
        assert expected[2].restarts == expected[2].num_restarts


def test_eigsh_tensor_and_operator_agree_and_seed_changes_the_start():
    A = rotated(SPECTRA["decaying"].tolist())
    v1, x1 = est.eigsh(A, k=2, seed=3)
    v2, x2 = est.eigsh(DenseOp(A), k=2, seed=3)
    assert torch.equal(v1, v2) and torch.equal(x1, x2)
    v3, _ = est.eigsh(A, k=2, seed=4)
    torch.testing.assert_close(v1, v3, rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------- trace


def mean_and_standard_error(samples):
    samples = torch.stack(samples)
    return samples.mean(), samples.std() / math.sqrt(len(samples))


@pytest.mark.parametrize("method", ["hutch++", "xtrace"])
@pytest.mark.parametrize("multiple", [1, 3])
def test_trace_exact_from_num_matvecs_P(method, multiple):
    A = rotated(torch.linspace(-3.0, 5.0, 20).tolist())
    op = DenseOp(A)
    torch.testing.assert_close(est.trace(op, multiple * 20, method), A.trace(), rtol=1e-12, atol=1e-12)
    assert op.matvecs == 20


@pytest.mark.parametrize(("method", "num_matvecs"), [("hutch++", 12), ("xtrace", 10)])
def test_trace_exact_on_low_rank(method, num_matvecs):
    # rank 4 of 60: Hutch++ needs num_matvecs // 3 >= 4, XTrace num_matvecs // 2 >= 5
    A = low_rank(60, 4)
    op = DenseOp(A)
    for seed in range(5):
        torch.testing.assert_close(est.trace(op, num_matvecs, method, seed=seed), A.trace(), rtol=1e-11, atol=0)
    assert op.matvecs <= 5 * num_matvecs


def test_trace_hutchinson_exact_on_diagonal():
    A = torch.diag(torch.linspace(-2.0, 7.0, 30, dtype=DT))
    torch.testing.assert_close(est.trace(A, 1, "hutchinson"), A.trace())


@pytest.mark.parametrize(("method", "num_matvecs"), [("hutchinson", 5), ("hutch++", 9), ("xtrace", 8)])
def test_trace_unbiased(method, num_matvecs):
    A = rotated(torch.linspace(-1.0, 3.0, 40).tolist(), seed=6)
    samples = [est.trace(A, num_matvecs, method, seed=seed) for seed in range(200)]
    mean, error = mean_and_standard_error(samples)
    assert abs(mean - A.trace()) <= 6 * error


@pytest.mark.parametrize(("method", "factor"), [("hutchinson", 2), ("hutch++", 20), ("xtrace", 20)])
def test_trace_error_shrinks_with_num_matvecs(method, factor):
    # from 6 to 36 products the mean squared error falls about 6x for Hutchinson (1/m) and 200x or
    # more for Hutch++ and XTrace on this decaying spectrum; with 200 seeds the relative standard
    # error of each mean is about 0.1-0.15, so `factor` leaves over 7 standard errors (in log scale)
    A = rotated((0.8 ** torch.arange(50.0)).tolist(), seed=7)
    exact = A.trace()

    def mse(m):
        return torch.stack([(est.trace(A, m, method, seed=s) - exact) ** 2 for s in range(200)]).mean()

    assert mse(36) < mse(6) / factor


def test_trace_hutch_plus_plus_and_xtrace_beat_hutchinson_on_decaying_spectra():
    # mean squared errors are about 0.1, 1.3e-3 and 6e-5: margins of 7x on each ratio, over 7 standard
    # errors of the log-ratio with 200 seeds
    A = rotated((0.7 ** torch.arange(60.0)).tolist(), seed=8)
    exact = A.trace()

    def mse(method):
        return torch.stack([(est.trace(A, 30, method, seed=s) - exact) ** 2 for s in range(200)]).mean()

    assert mse("hutch++") < mse("hutchinson") / 10
    assert mse("xtrace") < mse("hutch++") / 3


@pytest.mark.parametrize("num_matvecs", [3, 4, 10])
def test_zero_operator_trace_and_diagonal(num_matvecs):
    zero = torch.zeros(30, 30, dtype=DT)
    for method in ("hutchinson", "hutch++", "xtrace"):
        assert est.trace(zero, num_matvecs, method) == 0
    for method in ("hutchinson", "xdiag"):
        assert torch.equal(est.diagonal(zero, num_matvecs, method), torch.zeros(30, dtype=DT))


def test_trace_float32():
    A = low_rank(50, 3).float()
    torch.testing.assert_close(est.trace(A, 12, "xtrace"), A.double().trace().float(), rtol=1e-4, atol=0)


# ---------------------------------------------------------------------------------------------- diagonal


def test_diagonal_hutchinson_exact_on_diagonal():
    A = torch.diag(torch.linspace(-2.0, 7.0, 30, dtype=DT))
    torch.testing.assert_close(est.diagonal(A, 1), A.diagonal())


@pytest.mark.parametrize("num_matvecs", [20, 21, 60])
def test_diagonal_xdiag_exact_from_num_matvecs_P(num_matvecs):
    A = rotated(torch.linspace(-3.0, 5.0, 20).tolist())
    op = DenseOp(A)
    torch.testing.assert_close(est.diagonal(op, num_matvecs, "xdiag"), A.diagonal(), rtol=0, atol=1e-12)
    assert op.matvecs == 20


def test_diagonal_xdiag_exact_on_low_rank():
    # rank 4 of 60: exact once num_matvecs // 2 >= 5
    A = low_rank(60, 4)
    for seed in range(5):
        torch.testing.assert_close(est.diagonal(A, 10, "xdiag", seed=seed), A.diagonal(), rtol=0, atol=1e-11)


@pytest.mark.parametrize(("method", "num_matvecs"), [("hutchinson", 4), ("xdiag", 8)])
def test_diagonal_unbiased(method, num_matvecs):
    A = rotated(torch.linspace(-1.0, 3.0, 30).tolist(), seed=9)
    samples = torch.stack([est.diagonal(A, num_matvecs, method, seed=seed) for seed in range(200)])
    mean, error = samples.mean(0), samples.std(0) / math.sqrt(len(samples))
    assert torch.all((mean - A.diagonal()).abs() <= 6 * error + 1e-12)


def test_diagonal_xdiag_beats_hutchinson_on_decaying_spectra():
    # squared errors about 0.06 and 8e-5: 70x margin
    A = rotated((0.7 ** torch.arange(60.0)).tolist(), seed=10)

    def mse(method):
        errors = [(est.diagonal(A, 30, method, seed=s) - A.diagonal()).square().sum() for s in range(30)]
        return torch.stack(errors).mean()

    assert mse("xdiag") < mse("hutchinson") / 10


def test_diagonal_as_tree():
    A = rotated(torch.linspace(0.0, 1.0, 10).tolist())
    op = DenseOp(A, shapes={"bias": (2,), "weight": (2, 4)})
    tree = est.diagonal(op, 10, "xdiag", as_tree=True)
    assert set(tree) == {"bias", "weight"} and tree["weight"].shape == (2, 4)
    torch.testing.assert_close(torch.cat([tree["bias"], tree["weight"].reshape(-1)]), A.diagonal())
    with pytest.raises(
        TypeError,
        match=r"`functx.curvature.diagonal`: `op` must have an `unflatten` method for as_tree=True .* got a torch.float64 tensor",
    ):
        est.diagonal(A, 4, as_tree=True)


# ---------------------------------------------------------------------------------------------- spectral_density


def test_spectral_density_integrates_to_one_and_its_mean_is_the_hutchinson_trace():
    A = rotated(SPECTRA["hessian-like"].tolist(), seed=11)
    for seed in range(3):
        grid, density = est.spectral_density(A, num_probes=7, num_steps=25, seed=seed)
        assert grid.shape == density.shape == (1000,) and torch.all(density >= 0)
        torch.testing.assert_close(torch.trapezoid(density, grid), torch.tensor(1.0, dtype=DT), rtol=0, atol=1e-12)
        hutchinson = est.trace(A, 7, "hutchinson", seed=seed) / 150
        torch.testing.assert_close(torch.trapezoid(grid * density, grid), hutchinson, rtol=1e-12, atol=1e-12)


def smoothed(eigenvalues, grid, sigma):
    z = (grid[:, None] - eigenvalues) / sigma
    return torch.exp(-0.5 * z**2).mean(1) / (sigma * math.sqrt(2 * math.pi))


def test_spectral_density_approaches_the_eigenvalue_histogram():
    # two bumps and an outlier; with every probe the SLQ density is the Gaussian-smoothed eigenvalue
    # histogram up to O(1/sqrt(P * num_probes)) probe noise (Gauss quadrature error is negligible)
    eigenvalues = torch.cat([torch.linspace(0.0, 1.0, 150), torch.linspace(3.0, 3.5, 100), torch.tensor([8.0])])
    A = rotated(eigenvalues.tolist(), seed=12)
    grid = torch.linspace(-1.0, 9.0, 2001, dtype=DT)
    grid_out, density = est.spectral_density(A, num_probes=40, num_steps=60, grid=grid, sigma=0.1)
    assert torch.equal(grid_out, grid)
    truth = smoothed(eigenvalues.to(DT), grid, 0.1)
    l1 = torch.trapezoid((density - truth).abs(), grid)
    assert l1 < 0.08  # over 100 seeds: mean 0.025, standard deviation 0.006
    # mass of the two bumps
    for low, high, mass in [(-0.5, 1.5, 150 / 251), (2.5, 4.0, 100 / 251)]:
        inside = (grid >= low) & (grid <= high)
        assert abs(torch.trapezoid(density[inside], grid[inside]) - mass) < 0.04  # mean 0.005, std 0.004


def test_spectral_density_more_steps_than_the_krylov_space():
    A = low_rank(12, 3)
    grid, density = est.spectral_density(A, num_probes=30, num_steps=40)
    assert torch.isfinite(density).all()
    torch.testing.assert_close(torch.trapezoid(density, grid), torch.tensor(1.0, dtype=DT), rtol=0, atol=1e-12)
    # 9 of the 12 eigenvalues are zero: three quarters of the mass sits at 0 (probe noise: std 0.03)
    near_zero = grid.abs() < 0.2 * float(grid.max())
    assert abs(torch.trapezoid(density[near_zero], grid[near_zero]) - 0.75) < 0.2


def test_spectral_density_float32():
    A = rotated(SPECTRA["hessian-like"].tolist(), seed=13).float()
    grid, density = est.spectral_density(A, num_probes=5, num_steps=20)
    assert grid.dtype == density.dtype == torch.float32
    torch.testing.assert_close(torch.trapezoid(density, grid), torch.tensor(1.0), rtol=0, atol=1e-5)
    mean = torch.trapezoid(grid * density, grid)
    torch.testing.assert_close(mean, est.trace(A, 5, "hutchinson") / 150, rtol=1e-4, atol=1e-5)


def test_spectral_density_chunks_and_coarse_grid_warning():
    A = rotated(SPECTRA["decaying"].tolist())
    grid, density = est.spectral_density(A, num_probes=6, num_steps=10)
    op = DenseOp(A)
    grid2, density2 = est.spectral_density(op, num_probes=6, num_steps=10, chunk_size=4)
    torch.testing.assert_close((grid2, density2), (grid, density), rtol=1e-12, atol=1e-12)
    assert op.widest == 4 and op.matvecs == 60
    with pytest.warns(RuntimeWarning, match=r"`functx.curvature.spectral_density`: the grid spacing exceeds sigma"):
        est.spectral_density(A, num_probes=2, num_steps=5, num_points=10)


# ---------------------------------------------------------------------------------------------- purity


CALLS = {
    "eigsh": lambda A, seed: est.eigsh(A, k=2, seed=seed)[0],
    "trace-hutch++": lambda A, seed: est.trace(A, 9, "hutch++", seed=seed),
    "trace-xtrace": lambda A, seed: est.trace(A, 8, "xtrace", seed=seed),
    "trace-hutchinson": lambda A, seed: est.trace(A, 8, "hutchinson", seed=seed),
    "diagonal-hutchinson": lambda A, seed: est.diagonal(A, 8, seed=seed),
    "diagonal-xdiag": lambda A, seed: est.diagonal(A, 8, "xdiag", seed=seed),
    "spectral_density": lambda A, seed: est.spectral_density(A, 3, 8, seed=seed)[1],
}


@pytest.mark.parametrize("name", list(CALLS))
def test_reproducible_from_seed_and_pure(name):
    A = rotated(SPECTRA["indefinite"].tolist()).requires_grad_()
    before = A.detach().clone()
    state = torch.get_rng_state()
    first = CALLS[name](A, 5)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is never used
    assert torch.equal(CALLS[name](A, 5), first)  # same seed, same result (as on every rank)
    assert not first.requires_grad and A.requires_grad and A.grad is None
    assert torch.equal(A.detach(), before)
    if name != "eigsh":  # the top eigenvalues do not depend on the start, only on rounding
        assert not torch.equal(CALLS[name](A, 6), first)


def test_chunk_size_splits_products():
    A = rotated(SPECTRA["decaying"].tolist())
    for method in ("hutchinson", "hutch++", "xtrace"):
        op = DenseOp(A)
        torch.testing.assert_close(
            est.trace(op, 30, method, chunk_size=4), est.trace(A, 30, method), rtol=1e-12, atol=0
        )
        assert op.widest <= 4
    op = DenseOp(A)
    torch.testing.assert_close(est.diagonal(op, 200, "xdiag", chunk_size=7), A.diagonal(), rtol=0, atol=1e-12)
    assert op.widest == 7


# ---------------------------------------------------------------------------------------------- bad input


class NoMatmul:
    shape = (3, 3)
    dtype = DT
    device = torch.device("cpu")


class NaNOutput(DenseOp):
    def __matmul__(self, v):
        return super().__matmul__(v) * float("nan")


class WrongOutput(DenseOp):
    def __matmul__(self, v):
        return super().__matmul__(v)[:-1]


SQUARE = rotated([1.0, 2.0, 3.0, 4.0, 5.0])

BAD = [
    (
        lambda: est.eigsh([[1.0]]),
        TypeError,
        r"^`functx.curvature.eigsh`: `op` must be a square tensor or a linear operator .* got a value of type list",
    ),
    (lambda: est.eigsh(NoMatmul()), TypeError, r"^`functx.curvature.eigsh`: .* without '__matmul__'"),
    (
        lambda: est.eigsh(torch.ones(3, 4, dtype=DT)),
        ValueError,
        r"^`functx.curvature.eigsh`: `op` must be a square matrix .* \(3, 4\)",
    ),
    (
        lambda: est.eigsh(torch.eye(3, dtype=torch.int64)),
        TypeError,
        r"^`functx.curvature.eigsh`: `op` must have dtype .* torch.int64",
    ),
    (
        lambda: est.eigsh(torch.eye(3, dtype=torch.complex128)),
        TypeError,
        r"must have dtype torch.float32 or torch.float64",
    ),
    (
        lambda: est.eigsh(torch.triu(torch.ones(3, 3, dtype=DT))),
        ValueError,
        r"^`functx.curvature.eigsh`: `op` must be symmetric",
    ),
    (lambda: est.eigsh(SQUARE, k=0), ValueError, r"^`functx.curvature.eigsh`: `k` must be an int in \[1, 5\], got 0."),
    (lambda: est.eigsh(SQUARE, k=6), ValueError, r"`k` must be an int in \[1, 5\], got 6."),
    (lambda: est.eigsh(SQUARE, k=2.0), TypeError, r"`k` must be an int, got a value of type float."),
    (
        lambda: est.eigsh(SQUARE, k=1, which="BE"),
        ValueError,
        r"^`functx.curvature.eigsh`: `which` must be one of \['LA', 'SA', 'LM'\], got 'BE'.",
    ),
    (lambda: est.eigsh(SQUARE, k=1, tol=0.0), ValueError, r"`tol` must be positive, got 0.0."),
    (lambda: est.eigsh(SQUARE, k=1, ncv=2), ValueError, r"`ncv` must be an int >= 3, got 2."),
    (lambda: est.eigsh(SQUARE, k=2, max_matvecs=1), ValueError, r"`max_matvecs` must be an int >= 2, got 1."),
    (lambda: est.eigsh(SQUARE, k=1, seed="0"), TypeError, r"`seed` must be an int, got a value of type str."),
    (lambda: est.eigsh(SQUARE, k=1, throw=1), TypeError, r"`throw` must be a bool, got 1."),
    (lambda: est.eigsh(SQUARE, k=1, return_info="yes"), TypeError, r"`return_info` must be a bool, got 'yes'."),
    (
        lambda: est.eigsh(WrongOutput(low_rank(40, 40)), k=1),
        ValueError,
        r"`op @ V` must return the shape of V \(40, 1\), got shape \(39, 1\).",
    ),
    (
        lambda: est.trace(SQUARE, 2, "hutch++"),
        ValueError,
        r"^`functx.curvature.trace`: `num_matvecs` must be an int >= 3, got 2.",
    ),
    (
        lambda: est.trace(SQUARE, 1, "xtrace"),
        ValueError,
        r"^`functx.curvature.trace`: `num_matvecs` must be an int >= 2, got 1.",
    ),
    (lambda: est.trace(SQUARE, 0, "hutchinson"), ValueError, r"`num_matvecs` must be an int >= 1, got 0."),
    (
        lambda: est.trace(torch.zeros(0, 0, dtype=DT)),
        ValueError,
        r"^`functx.curvature.trace`: `op` must have at least one row, got shape \(0, 0\).",
    ),
    (
        lambda: est.trace(SQUARE, 9, "exact"),
        ValueError,
        r"^`functx.curvature.trace`: `method` must be one of \['hutch\+\+', 'hutchinson', 'xtrace'\], got 'exact'.",
    ),
    (lambda: est.trace(SQUARE, 9, chunk_size=0), ValueError, r"`chunk_size` must be an int >= 1, got 0."),
    (
        lambda: est.diagonal(SQUARE, 9, "xtrace"),
        ValueError,
        r"^`functx.curvature.diagonal`: `method` must be one of \['hutchinson', 'xdiag'\], got 'xtrace'.",
    ),
    (lambda: est.diagonal(SQUARE, 1, "xdiag"), ValueError, r"`num_matvecs` must be an int >= 2, got 1."),
    (
        lambda: est.spectral_density(SQUARE, 0),
        ValueError,
        r"^`functx.curvature.spectral_density`: `num_probes` must be an int >= 1, got 0.",
    ),
    (lambda: est.spectral_density(SQUARE, 2, 0), ValueError, r"`num_steps` must be an int >= 1, got 0."),
    (
        lambda: est.spectral_density(SQUARE, 2, 2, sigma=-1.0),
        ValueError,
        r"`sigma` must be positive, got -1.0.",
    ),
    (
        lambda: est.spectral_density(SQUARE, 2, 2, grid=[0.0, 1.0]),
        TypeError,
        r"`grid` must be None or a 1-D tensor, got a value of type list.",
    ),
    (
        lambda: est.spectral_density(SQUARE, 2, 2, grid=torch.zeros(2, 2)),
        ValueError,
        r"`grid` must be a 1-D tensor of at least 2 points, got shape \(2, 2\).",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_no_warning_on_good_calls():
    A = rotated(SPECTRA["decaying"].tolist())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est.eigsh(A, k=1)
        est.trace(A)
        est.diagonal(A, method="xdiag")
        est.spectral_density(A)


def test_curvature_doctests_compare_no_float_digits():
    """Issue 15, item 1: a doctest that prints a float compares digits a different CPU may not
    print (``1.0000...`` against ``1.0``); every float a curvature doctest prints is rounded."""
    import doctest
    import importlib
    import pkgutil
    import re

    import functx._curvature as package

    names = [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]
    offenders = []
    for name in ["functx.curvature", *names]:
        for test in doctest.DocTestFinder().find(importlib.import_module(name)):
            for example in test.examples:
                if re.search(r"\d\.", example.want) and "round(" not in example.source:
                    offenders.append(f"{test.name}: {example.source.strip()} -> {example.want.strip()}")
    assert not offenders, "\n".join(offenders)
