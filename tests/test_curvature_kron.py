"""Kronecker-factored algebra (functx/_curvature/_kron.py), InverseOperator and the lazy
composition of curvature operators, against independent float64 dense references.

The Kronecker operators here are hand-built random PSD blocks through a tiny test subclass of
KroneckerOperatorBase: a joint weight+bias block, a weight with a separate (G-only) bias, a
transposed Embedding block with a diagonal A, and a diagonal block."""

from __future__ import annotations

import math
import threading
import warnings

import pytest
import torch
from torch import nn

import functx
import functx.curvature as fc
from functx._curvature import _kron
from functx._curvature._base import CurvatureOperatorBase
from functx._curvature._kron import KronBlock, KroneckerOperatorBase, factor_eigh
from functx._curvature._params import Layout

F64 = torch.float64


# -- the test operator and its dense reference ------------------------------------------------


class Kron(KroneckerOperatorBase):
    def __init__(self, params, blocks, eigen=None):
        self._api = "functx.curvature.TestKron"
        self._layout = Layout(params, self._api)
        self._num_data = 7
        self._set_blocks(blocks, eigen)


def psd(k, gen, rank=None, dtype=F64):
    X = torch.randn(k, rank or k + 2, generator=gen, dtype=F64)
    return (X @ X.T / X.shape[1]).to(dtype)


PARAM_SHAPES = {
    "l1.weight": (3, 4),
    "l1.bias": (3,),
    "l2.weight": (2, 3),
    "l2.bias": (2,),
    "emb.weight": (5, 3),
    "norm.weight": (4,),
}

MLP_SHAPES = {"0.weight": (4, 3), "0.bias": (4,), "2.weight": (2, 4), "2.bias": (2,)}  # mlp_problem's
ALL_SHAPES = {**PARAM_SHAPES, **MLP_SHAPES}


def make(ekfac=False, seed=0, dtype=F64, singular=False):
    gen = torch.Generator().manual_seed(seed)
    params = {k: torch.zeros(s, dtype=dtype) for k, s in PARAM_SHAPES.items()}
    rank = 2 if singular else None
    blocks = {
        "l1.weight": KronBlock(("l1.weight", "l1.bias"), psd(3, gen, rank, dtype), psd(5, gen, rank, dtype)),
        "l2.weight": KronBlock(("l2.weight",), psd(2, gen, dtype=dtype), psd(3, gen, dtype=dtype)),
        "l2.bias": KronBlock(("l2.bias",), psd(2, gen, dtype=dtype), None),
        "emb.weight": KronBlock(
            ("emb.weight",),
            psd(3, gen, dtype=dtype),
            torch.rand(5, generator=gen, dtype=F64).to(dtype) + 0.1,
            None,
            transposed=True,
        ),
        "norm.weight": KronBlock(("norm.weight",), torch.rand(4, generator=gen, dtype=F64).to(dtype), None),
    }
    if ekfac:
        for name, b in list(blocks.items()):
            if b.G.ndim == 2:
                shape = (b.G.shape[0],) if b.A is None else (b.G.shape[0], b.A.shape[0])
                lam = torch.rand(shape, generator=gen, dtype=F64).to(dtype) + 0.05
                blocks[name] = b._replace(eigenvalues=lam)
    return Kron(params, blocks)


def transpose_perm(m, n):
    """P with P vec_row(V) = vec_row(V^T) for V of shape (m, n)."""
    idx = torch.arange(m * n).reshape(m, n).T.reshape(-1)
    return torch.eye(m * n, dtype=F64)[idx]


def dense_block(b: KronBlock) -> torch.Tensor:
    G = b.G.to(F64)
    if G.ndim == 1:
        return torch.diag(G)
    if b.A is None:
        if b.eigenvalues is None:
            return G
        _, Q = torch.linalg.eigh(G)
        return Q @ torch.diag(b.eigenvalues.to(F64)) @ Q.T
    A = b.A.to(F64)
    QA = torch.eye(A.shape[0], dtype=F64) if A.ndim == 1 else torch.linalg.eigh(A)[1]  # a diagonal A: identity basis
    A = torch.diag(A) if A.ndim == 1 else A
    if b.eigenvalues is None:
        M = torch.kron(G, A)
    else:
        Q = torch.kron(torch.linalg.eigh(G)[1].contiguous(), QA.contiguous())
        M = Q @ torch.diag(b.eigenvalues.to(F64).reshape(-1)) @ Q.T
    return arrange(b, M)


def arrange(b: KronBlock, M: torch.Tensor) -> torch.Tensor:
    """From the matrix acting on vec_row(V) to the one acting on the block's slice."""
    m, n = b.G.shape[0], M.shape[0] // b.G.shape[0]
    if b.transposed:
        P = transpose_perm(m, n)
        return P @ M @ P.T
    if len(b.params) > 1:  # [W | b]: the slice is vec(W) then b
        P = joint_perm(m, [math.prod(ALL_SHAPES[p]) for p in b.params])
        return P.T @ M @ P
    return M


def joint_perm(m, piece_sizes):
    """P with P slice = vec_row([P_1 | P_2 | ...]), each piece reshaped to (m, n_i)."""
    idx = torch.arange(sum(piece_sizes))
    cols = [p.reshape(m, -1) for p in idx.split(piece_sizes)]
    return torch.eye(len(idx), dtype=F64)[torch.cat(cols, dim=1).reshape(-1)]


def dense(K) -> torch.Tensor:
    return torch.block_diag(*[dense_block(K.blocks[name]) for name in K.blocks])


def block_sizes(K):
    return [sum(math.prod(PARAM_SHAPES[p]) for p in K.blocks[name].params) for name in K.blocks]


def eye_like(M):
    return torch.eye(M.shape[0], dtype=M.dtype)


def sym_fn(M, f):
    vals, vecs = torch.linalg.eigh(M)
    return vecs @ torch.diag(f(vals)) @ vecs.T


KINDS = ["kfac", "ekfac"]


@pytest.fixture(params=KINDS)
def K(request):
    return make(ekfac=request.param == "ekfac")


def randv(P, *cols, seed=0):
    return torch.randn(P, *cols, generator=torch.Generator().manual_seed(seed), dtype=F64)


# -- the operator itself -----------------------------------------------------------------------


def test_products_and_dense(K):
    D = dense(K)
    P = D.shape[0]
    assert K.shape == (P, P) and K.dtype == F64 and K.num_data == 7
    torch.testing.assert_close(K.to_dense(), D)
    v, V = randv(P), randv(P, 3)
    torch.testing.assert_close(K @ v, D @ v)
    torch.testing.assert_close(K @ V, D @ V)
    tree = K @ K.unflatten(v)
    assert list(tree) == list(PARAM_SHAPES)
    torch.testing.assert_close(K.flatten(tree), D @ v)
    torch.testing.assert_close(K.flatten({k: t[..., 1] for k, t in (K @ K.unflatten(V)).items()}), D @ V[:, 1])


def test_block_of_the_interface_example():
    # G ⊗ A on the row-major vec of a 2x3 weight: (G ⊗ A) vec(V) = vec(G V A)
    G = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=F64)
    A = torch.tensor([[1.0, 0.5, 0.0], [0.5, 2.0, 0.0], [0.0, 0.0, 4.0]], dtype=F64)
    K = Kron({"w": torch.zeros(2, 3, dtype=F64)}, {"w": KronBlock(("w",), G, A)})
    V = torch.arange(6, dtype=F64).reshape(2, 3)
    torch.testing.assert_close(K @ V.reshape(-1), (G @ V @ A).reshape(-1))
    torch.testing.assert_close(K.to_dense(), torch.kron(G, A))
    # a joint bias: V = [W | b] (2 x 4), the slice is vec(W) then b
    A4 = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)) + 0.1
    params = {"w": torch.zeros(2, 3, dtype=F64), "b": torch.zeros(2, dtype=F64)}
    K = Kron(params, {"w": KronBlock(("w", "b"), G, A4)})
    b = torch.tensor([10.0, 20.0], dtype=F64)
    Wb = torch.cat([V, b[:, None]], dim=1)
    out = G @ Wb @ A4
    torch.testing.assert_close(K @ torch.cat([V.reshape(-1), b]), torch.cat([out[:, :3].reshape(-1), out[:, 3]]))
    torch.testing.assert_close(
        K.diagonal(), torch.cat([(G.diag()[:, None] * A4.diag()).T[:3].T.reshape(-1), G.diag() * A4[3, 3]])
    )


def test_closed_forms(K):
    D = dense(K)
    torch.testing.assert_close(K.trace(), D.trace())
    torch.testing.assert_close(K.diagonal(), D.diagonal())
    torch.testing.assert_close(K.flatten(K.diagonal(as_tree=True)), D.diagonal())
    torch.testing.assert_close(K.frobenius_norm(), torch.linalg.matrix_norm(D))
    for delta in (0.0, 0.3):
        torch.testing.assert_close(K.logdet(delta), torch.linalg.slogdet(D + delta * eye_like(D))[1])


def test_blocks_read_only(K):
    with pytest.raises(TypeError):
        K.blocks["x"] = None  # type: ignore[index]
    assert isinstance(K.blocks["l2.bias"], KronBlock)


# -- inverse and power -------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [1e-3, 0.5, "tensor"])
def test_exact_inverse(K, delta):
    delta = torch.tensor(0.2, dtype=F64) if delta == "tensor" else delta
    D = dense(K) + float(delta) * eye_like(dense(K))
    Ki = K.inverse(delta)
    assert isinstance(Ki, CurvatureOperatorBase)
    v = randv(K.shape[0])
    torch.testing.assert_close(Ki @ (K @ v + delta * v), v)
    torch.testing.assert_close(Ki.to_dense(), torch.linalg.inv(D))
    torch.testing.assert_close(Ki @ randv(K.shape[0], 2), torch.linalg.solve(D, randv(K.shape[0], 2)))
    torch.testing.assert_close(Ki.trace(), torch.linalg.inv(D).trace())
    torch.testing.assert_close(Ki.diagonal(), torch.linalg.inv(D).diagonal())
    torch.testing.assert_close(Ki.flatten(Ki.diagonal(as_tree=True)), torch.linalg.inv(D).diagonal())
    S = K.power(0.5, damping=delta)
    torch.testing.assert_close(S.diagonal(), sym_fn(D, torch.sqrt).diagonal())


def test_exact_inverse_of_singular_factors():
    K = make(singular=True)
    D = dense(K)
    assert torch.linalg.matrix_rank(D) < D.shape[0]
    torch.testing.assert_close(K.inverse(1e-2).to_dense(), torch.linalg.inv(D + 1e-2 * eye_like(D)))
    assert K.logdet(0.0) == -math.inf
    for call in (lambda: K.inverse(0.0), lambda: K.power(-0.5, damping=0.0), lambda: K.inverse(0.0, mode="factors")):
        with pytest.raises(ValueError, match=r"block 'l1.weight' of K \+ δI is singular"):
            call()
    torch.testing.assert_close(K.power(0.5, damping=0.0).to_dense(), sym_fn(D, lambda x: x.clamp(min=0).sqrt()))


@pytest.mark.parametrize("p", [1.0, 2.0, 0.5, -0.5, -0.3, -2.0])
def test_power(K, p):
    D = dense(K)
    torch.testing.assert_close(K.power(p, damping=0.1).to_dense(), sym_fn(D + 0.1 * eye_like(D), lambda x: x**p))


def test_power_half_squared_is_inverse(K):
    S = K.power(-0.5, damping=1e-2)
    torch.testing.assert_close((S @ S).to_dense(), K.inverse(1e-2).to_dense())
    torch.testing.assert_close(K.power(-1.0, damping=1e-2).to_dense(), K.inverse(1e-2).to_dense())
    torch.testing.assert_close(K.power(1, damping=0.0).to_dense(), dense(K))


def test_logdet_gradient_is_inverse_trace(K):
    delta = torch.tensor(0.05, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(K.logdet(delta), delta)
    D = dense(K)
    torch.testing.assert_close(grad, torch.linalg.inv(D + 0.05 * eye_like(D)).trace())
    # the inverse and the power are differentiable in the damping too
    v = randv(K.shape[0])
    delta = torch.tensor(0.05, dtype=F64, requires_grad=True)
    (g_inv,) = torch.autograd.grad(v @ (K.inverse(delta) @ v), delta)
    Di = torch.linalg.inv(D + 0.05 * eye_like(D))
    torch.testing.assert_close(g_inv, -(v @ Di @ Di @ v))
    delta = torch.tensor(0.05, dtype=F64, requires_grad=True)
    (g_pow,) = torch.autograd.grad(K.power(-0.5, delta).to_dense().trace(), delta)
    torch.testing.assert_close(g_pow, -0.5 * sym_fn(D + 0.05 * eye_like(D), lambda x: x**-1.5).trace())


def test_per_block_damping_dict(K):
    deltas = {"l1.weight": 0.1, "l2.weight": 0.2, "l2.bias": 0.3, "emb.weight": 0.4, "norm.weight": 0.5}
    diag = torch.cat([torch.full((s,), deltas[n], dtype=F64) for n, s in zip(K.blocks, block_sizes(K))])
    D = dense(K) + torch.diag(diag)
    torch.testing.assert_close(K.inverse(deltas).to_dense(), torch.linalg.inv(D))
    torch.testing.assert_close(K.power(-0.5, deltas).to_dense(), sym_fn(D, lambda x: x**-0.5))
    torch.testing.assert_close(K.logdet(deltas), torch.linalg.slogdet(D)[1])
    # differentiable per block: d logdet / d δ_l = trace of block l of (K + δ)^-1
    tdeltas = {k: torch.tensor(v, dtype=F64, requires_grad=True) for k, v in deltas.items()}
    grads = torch.autograd.grad(K.logdet(tdeltas), list(tdeltas.values()))
    Di, start = torch.linalg.inv(D), 0
    for g, size in zip(grads, block_sizes(K)):
        torch.testing.assert_close(g, Di[start : start + size, start : start + size].trace())
        start += size
    with pytest.raises(ValueError, match=r"missing \['norm.weight'\]"):
        K.inverse({k: v for k, v in deltas.items() if k != "norm.weight"})
    with pytest.raises(ValueError, match=r"unknown \['nope'\]"):
        K.logdet({**deltas, "nope": 1.0})
    with pytest.raises(ValueError, match=r"damping\['l2.bias'\]"):
        K.power(0.5, {**deltas, "l2.bias": -1.0})


def factor_inverse_reference(K, delta, heuristic):
    blocks = []
    root = math.sqrt(delta)
    for b in K.blocks.values():
        if b.A is None:  # G-only and diagonal blocks: damped by δ on G
            G = torch.diag(b.G) if b.G.ndim == 1 else b.G
            blocks.append(torch.linalg.inv(G + delta * eye_like(G)))
            continue
        A = torch.diag(b.A) if b.A.ndim == 1 else b.A
        pi = math.sqrt((A.trace() / A.shape[0]) / (b.G.trace() / b.G.shape[0])) if heuristic else 1.0
        M = torch.kron(torch.linalg.inv(b.G + root / pi * eye_like(b.G)), torch.linalg.inv(A + root * pi * eye_like(A)))
        blocks.append(arrange(b, M))
    return torch.block_diag(*blocks)


@pytest.mark.parametrize("mode", ["factors", "heuristic"])
def test_factor_modes_closed_form(mode):
    K = make()
    for delta in (1e-3, 0.3):
        ref = factor_inverse_reference(K, delta, mode == "heuristic")
        torch.testing.assert_close(K.inverse(delta, mode=mode).to_dense(), ref)
    # "factors" is not the exact inverse (its cross term √δ (G ⊗ I + I ⊗ A) is extra)
    assert not torch.allclose(K.inverse(0.3, mode=mode).to_dense(), K.inverse(0.3).to_dense(), atol=1e-3)


def test_factor_modes_refused_on_ekfac():
    E = make(ekfac=True)
    for mode in ("factors", "heuristic"):
        with pytest.raises(ValueError, match=r"supports? mode='exact' only"):
            E.inverse(1e-3, mode=mode)


def test_float32_factors_decompose_in_float64():
    K32, K64 = make(dtype=torch.float32), make()
    e = K32._eigen("l1.weight")
    assert e.g_vals.dtype == F64 and e.g_vecs is not None and e.g_vecs.dtype == F64
    Ki = K32.inverse(1e-2)
    assert Ki.dtype == torch.float32 and (Ki @ torch.ones(K32.shape[0])).dtype == torch.float32
    torch.testing.assert_close(Ki.to_dense().double(), K64.inverse(1e-2).to_dense(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(K32.logdet(1e-2).double(), K64.logdet(1e-2), rtol=1e-5, atol=1e-5)


def test_eigendecompositions_once_and_thread_safe(monkeypatch):
    K = make()
    calls = []
    original = _kron.factor_eigh

    def counting(M, dtype=None):
        calls.append(tuple(M.shape))
        return original(M, dtype)

    monkeypatch.setattr(_kron, "factor_eigh", counting)
    results = []

    def work():
        results.append(K.inverse(0.1).to_dense())

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    K.logdet(0.2), K.power(0.5, 0.3), K.inverse(0.4, mode="heuristic")
    # one decomposition per factor: 4 matrix G's, 2 matrix A's, 1 diagonal A, 1 diagonal block
    assert len(calls) == 8
    for r in results[1:]:
        torch.testing.assert_close(r, results[0])


def test_seeded_eigen_is_used():
    E = make(ekfac=True)
    blocks = dict(E.blocks)
    eigen = {}
    for name, b in blocks.items():
        if b.G.ndim == 2:
            g_vals, g_vecs = factor_eigh(b.G)
            a = (None, None) if b.A is None else factor_eigh(b.A)
            eigen[name] = (g_vals, -g_vecs, *a)  # another valid sign choice
    E2 = Kron({k: torch.zeros(s, dtype=F64) for k, s in PARAM_SHAPES.items()}, blocks, eigen)
    assert E2._eigen("l1.weight").g_vecs is eigen["l1.weight"][1]
    torch.testing.assert_close(E2.to_dense(), dense(E))


def test_factor_eigh():
    M = psd(4, torch.Generator().manual_seed(3), dtype=torch.float32)
    vals, vecs = factor_eigh(M)
    assert vals.dtype == F64 and vecs is not None
    torch.testing.assert_close(vecs @ torch.diag(vals) @ vecs.T, M.double(), rtol=1e-6, atol=1e-6)
    assert bool((vals[1:] >= vals[:-1]).all())
    d = torch.rand(3)
    vals, vecs = factor_eigh(d)
    assert vecs is None and torch.equal(vals, d.double())


# -- bad input ---------------------------------------------------------------------------------


def test_bad_damping_mode_p(K):
    for method in (K.inverse, K.logdet, lambda d: K.power(0.5, d)):
        with pytest.raises(ValueError, match=r"`damping` must be .*non-negative"):
            method(-1.0)
        with pytest.raises(ValueError, match="`damping` must be finite and non-negative"):
            method(torch.tensor(-0.1, dtype=F64))
        with pytest.raises(TypeError, match="`damping` must be a float"):
            method("big")
        with pytest.raises(TypeError, match="0-d tensor"):
            method(torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match="`mode` must be one of"):
        K.inverse(1e-3, mode="damped")
    with pytest.raises(TypeError, match="`mode` must be one of"):
        K.inverse(1e-3, mode=None)
    with pytest.raises(TypeError, match="`p` must be a real number"):
        K.power("half")
    with pytest.raises(TypeError, match="`as_tree` must be a bool"):
        K.diagonal(as_tree=1)


def test_bad_v(K):
    P = K.shape[0]
    with pytest.raises(ValueError, match=r"`v` must have shape"):
        K @ torch.ones(P + 1, dtype=F64)
    with pytest.raises(ValueError, match=r"`v` must have shape"):
        K.inverse() @ torch.ones(P, 2, 2, dtype=F64)
    with pytest.raises(ValueError, match="keys of params"):
        K @ {"l1.weight": torch.ones(3, 4, dtype=F64)}
    with pytest.raises(ValueError, match=r"params\['l1.bias'\]"):
        K.power(0.5) @ {
            k: torch.ones(s, dtype=F64) if k != "l1.bias" else torch.ones(4) for k, s in PARAM_SHAPES.items()
        }


def test_bad_blocks():
    params = {"w": torch.zeros(2, 3, dtype=F64), "b": torch.zeros(2, dtype=F64)}
    G, A = torch.eye(2, dtype=F64), torch.eye(3, dtype=F64)
    with pytest.raises(ValueError, match=r"\['b'\] are in no block"):
        Kron(params, {"w": KronBlock(("w",), G, A)})
    with pytest.raises(ValueError, match="cannot act on its 8 entries"):
        Kron(params, {"w": KronBlock(("w", "b"), G, A)})
    with pytest.raises(ValueError, match="in two blocks"):
        Kron(params, {"w": KronBlock(("w", "b"), G, torch.eye(4, dtype=F64)), "b": KronBlock(("b",), G, None)})
    with pytest.raises(ValueError, match="named after its first parameter"):
        Kron(params, {"x": KronBlock(("w",), G, A), "b": KronBlock(("b",), G, None)})
    with pytest.raises(TypeError, match=r"must be a torch\.float64 tensor"):
        Kron(params, {"w": KronBlock(("w",), G.float(), A), "b": KronBlock(("b",), G, None)})
    with pytest.raises(ValueError, match="of one parameter can be transposed"):
        Kron(params, {"w": KronBlock(("w", "b"), G, torch.ones(4, dtype=F64), transposed=True)})
    with pytest.raises(ValueError, match="must be a multiple of m = 4"):
        Kron(params, {"w": KronBlock(("w", "b"), torch.eye(4, dtype=F64), torch.eye(2, dtype=F64))})
    with pytest.raises(ValueError, match="`eigenvalues` must have shape"):
        Kron(params, {"w": KronBlock(("w",), G, A, torch.ones(3, 2, dtype=F64)), "b": KronBlock(("b",), G, None)})


# -- estimators on the new operators -----------------------------------------------------------


def test_estimators_accept_the_new_operators(K):
    D = dense(K)
    P = D.shape[0]
    Ki, S = K.inverse(0.1), K.power(0.5, damping=0.1)
    for op, ref in (
        (K, D),
        (Ki, torch.linalg.inv(D + 0.1 * eye_like(D))),
        (S, sym_fn(D + 0.1 * eye_like(D), torch.sqrt)),
    ):
        vals, _ = fc.eigsh(op, k=3, which="LA")
        torch.testing.assert_close(vals.sort().values, torch.linalg.eigvalsh(ref)[-3:])
        torch.testing.assert_close(fc.trace(op, num_matvecs=3 * P, method="hutch++"), ref.trace())
        torch.testing.assert_close(fc.diagonal(op, num_matvecs=2 * P, method="xdiag"), ref.diagonal())
        grid, density = fc.spectral_density(op, num_probes=2, num_steps=P)
        integral = torch.trapezoid(density, grid)
        assert abs(float(integral) - 1.0) < 0.05


# -- InverseOperator -----------------------------------------------------------------------------


def mlp_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    X = torch.randn(10, 3, dtype=F64)
    y = torch.randn(10, 2, dtype=F64)
    data = list(zip(X.split([4, 4, 2]), y.split([4, 4, 2])))
    params = dict(model.named_parameters())
    return model, nn.MSELoss(), params, data


@pytest.fixture(scope="module")
def operators():
    model, loss, params, data = mlp_problem()
    return {
        "H": fc.HessianOperator(model, loss, params, data),
        "G": fc.GGNOperator(model, loss, params, data),
        "F": fc.EFOperator(model, loss, params, data),
    }


def test_inverse_operator_on_ggn(operators):
    G = operators["G"]
    D = G.to_dense()
    P = D.shape[0]
    Gi = fc.InverseOperator(G, damping=1e-2)
    v = randv(P)
    torch.testing.assert_close(Gi @ v, torch.linalg.solve(D + 1e-2 * eye_like(D), v))
    assert Gi.converged is True and Gi.num_steps >= 1 and Gi.num_matvecs >= Gi.num_steps
    assert Gi.residual_norm <= 1e-10 * float(v.norm())
    V = randv(P, 3)
    torch.testing.assert_close(Gi @ V, torch.linalg.solve(D + 1e-2 * eye_like(D), V))
    tree = Gi @ G.unflatten(v)
    torch.testing.assert_close(G.flatten(tree), torch.linalg.solve(D + 1e-2 * eye_like(D), v))
    assert Gi.shape == G.shape and Gi.dtype == F64 and Gi.num_data == G.num_data


def test_inverse_operator_minres_on_indefinite(operators):
    H = operators["H"]
    D = H.to_dense()
    assert torch.linalg.eigvalsh(D)[0] < 0  # a Hessian away from a minimum
    Hi = fc.InverseOperator(H, damping=0.1, method="minres", rtol=1e-10)
    v = randv(D.shape[0])
    torch.testing.assert_close(Hi @ v, torch.linalg.solve(D + 0.1 * eye_like(D), v), rtol=1e-6, atol=1e-6)


def test_inverse_operator_preconditioned_by_kron():
    K = make()
    D = dense(K)
    # K preconditions K + a small perturbation: CG converges in fewer steps than without
    gen = torch.Generator().manual_seed(5)
    E = torch.randn(D.shape[0], D.shape[0], generator=gen, dtype=F64) * 1e-3
    M = D + E @ E.T
    v = randv(D.shape[0])
    plain = fc.InverseOperator(M, damping=1e-2)
    pre = fc.InverseOperator(M, damping=1e-2, preconditioner=K.inverse(1e-2))
    torch.testing.assert_close(pre @ v, torch.linalg.solve(M + 1e-2 * eye_like(M), v))
    torch.testing.assert_close(plain @ v, pre @ v)
    assert pre.num_steps < plain.num_steps
    # the exact operator as its own preconditioner: one iteration
    exact = fc.InverseOperator(K, damping=1e-2, preconditioner=K.inverse(1e-2))
    torch.testing.assert_close(exact @ v, K.inverse(1e-2) @ v)
    assert exact.num_steps == 1


def test_inverse_operator_nonconvergence():
    K = make()
    v = randv(K.shape[0])
    Ki = fc.InverseOperator(K, damping=1e-3, max_iter=1)
    with pytest.raises(functx.NonConvergenceError, match="InverseOperator") as info:
        Ki @ v
    assert set(info.value.stats) == {"converged", "num_steps", "num_matvecs", "residual_norm"}
    assert info.value.stats["converged"] is False and Ki.converged is False
    quiet = fc.InverseOperator(K, damping=1e-3, max_iter=1, throw=False)
    with pytest.warns(functx.NonConvergenceWarning):
        quiet @ v


def test_inverse_operator_foreign_and_composite(operators):
    G, H = operators["G"], operators["H"]
    D = G.to_dense() + 0.1 * H.to_dense()
    v = randv(D.shape[0])
    ref = torch.linalg.solve(D + 0.5 * eye_like(D), v)
    torch.testing.assert_close(fc.InverseOperator(G + 0.1 * H, damping=0.5) @ v, ref)

    class Foreign:  # only `shape` and `@`
        shape = D.shape

        def __matmul__(self, x):
            return D @ x

    Fi = fc.InverseOperator(Foreign(), damping=0.5)
    assert Fi.dtype == torch.get_default_dtype() or Fi.dtype == F64
    torch.testing.assert_close(fc.InverseOperator(D, damping=0.5) @ v, ref)
    with pytest.raises(TypeError, match="`v` must be a tensor"):
        fc.InverseOperator(D, damping=0.5) @ {"v": v}


def test_inverse_operator_refuses_transforms_and_differentiates_by_autograd():
    K = make()
    Ki = fc.InverseOperator(K, damping=0.1)
    with pytest.raises(TypeError, match="Krylov solve"):
        torch.func.vmap(lambda x: Ki @ x)(torch.ones(2, K.shape[0], dtype=F64))
    D = dense(K) + 0.1 * eye_like(dense(K))
    v, u = randv(K.shape[0]), randv(K.shape[0], seed=1)
    w = v.clone().requires_grad_()
    (g,) = torch.autograd.grad(u @ (Ki @ w), w)  # through the CG iterations
    torch.testing.assert_close(g, torch.linalg.solve(D, u))
    delta = torch.tensor(0.1, dtype=F64, requires_grad=True)
    (gd,) = torch.autograd.grad(u @ (fc.InverseOperator(K, damping=delta) @ v), delta)
    torch.testing.assert_close(gd, -(u @ torch.linalg.solve(D, torch.linalg.solve(D, v))))


def test_inverse_operator_bad_input(operators):
    G = operators["G"]
    with pytest.raises(ValueError, match="`method` must be one of"):
        fc.InverseOperator(G, method="lu")
    with pytest.raises(ValueError, match="`damping` must be non-negative"):
        fc.InverseOperator(G, damping=-1.0)
    with pytest.raises(ValueError, match="`damping` must be finite and non-negative"):
        fc.InverseOperator(G, damping=torch.tensor(-1.0))
    with pytest.raises(TypeError, match="`op` must be an operator"):
        fc.InverseOperator(3.0)
    with pytest.raises(ValueError, match="`op` must be square"):
        fc.InverseOperator(torch.ones(2, 3))
    with pytest.raises(TypeError, match="`preconditioner` must be None or an operator"):
        fc.InverseOperator(G, preconditioner=lambda r: r)
    with pytest.raises(ValueError, match="`preconditioner` must have the shape"):
        fc.InverseOperator(G, preconditioner=torch.eye(3, dtype=F64))
    with pytest.raises(TypeError, match="`throw` must be a bool"):
        fc.InverseOperator(G, throw=1)
    with pytest.raises(ValueError, match="`max_iter` must be an int"):
        fc.InverseOperator(G, max_iter=-1)
    with pytest.raises(ValueError, match=r"`v` must have shape"):
        fc.InverseOperator(G) @ torch.ones(2, dtype=F64)
    with pytest.raises(TypeError, match=r"cannot run inside a functx/torch\.func transform"):
        torch.func.vmap(lambda x: fc.InverseOperator(G) @ x)(torch.ones(2, G.shape[0], dtype=F64))


# -- lazy composition -----------------------------------------------------------------------------


def all_operators(operators):
    """Every operator kind on the mlp's params, with its dense matrix."""
    G = operators["G"]
    gen = torch.Generator().manual_seed(2)
    params = {k: torch.zeros(s, dtype=F64) for k, s in G._layout.to_tree(G._layout.leaves).items() for s in [s.shape]}
    blocks = {
        "0.weight": KronBlock(("0.weight", "0.bias"), psd(4, gen), psd(4, gen)),
        "2.weight": KronBlock(("2.weight",), psd(2, gen), psd(4, gen)),
        "2.bias": KronBlock(("2.bias",), psd(2, gen), None),
    }
    K = Kron(params, blocks)
    Kd = torch.block_diag(*[dense_block(b) for b in blocks.values()])
    ops = {name: (op, op.to_dense()) for name, op in operators.items()}
    ops["K"] = (K, Kd)
    ops["Ki"] = (K.inverse(0.1), torch.linalg.inv(Kd + 0.1 * eye_like(Kd)))
    ops["Gi"] = (fc.InverseOperator(operators["G"], 0.1), torch.linalg.inv(ops["G"][1] + 0.1 * eye_like(Kd)))
    return ops


def test_composition_dense_references(operators):
    ops = all_operators(operators)
    v = randv(ops["K"][1].shape[0], 2)
    names = list(ops)
    for i, a in enumerate(names):
        b = names[(i + 1) % len(names)]
        (A, Ad), (B, Bd) = ops[a], ops[b]
        for combo, ref in (
            (A + B, Ad + Bd),
            (A - B, Ad - Bd),
            (2.5 * A, 2.5 * Ad),
            (A * 2.5, 2.5 * Ad),
            (-A, -Ad),
            (A @ B, Ad @ Bd),
            (0.5 * (A - 0.1 * B) + B @ A, 0.5 * (Ad - 0.1 * Bd) + Bd @ Ad),
        ):
            torch.testing.assert_close(combo @ v, ref @ v, msg=f"{a}, {b}")
    combo = ops["G"][0] - ops["K"][0]
    torch.testing.assert_close(combo.to_dense(), ops["G"][1] - ops["K"][1])
    vals, _ = fc.eigsh(combo, k=2, which="LA")
    torch.testing.assert_close(vals.sort().values, torch.linalg.eigvalsh(ops["G"][1] - ops["K"][1])[-2:])


def test_composition_tensor_scalar_is_differentiable(operators):
    K, Kd = all_operators(operators)["K"]
    v = randv(Kd.shape[0])
    for c in (torch.tensor(2.0, dtype=F64, requires_grad=True), torch.tensor(2.0, requires_grad=True)):
        for scaled in (c * K, K * c, c * (K + K)):
            (grad,) = torch.autograd.grad((scaled @ v).sum(), c)
            factor = 2.0 if isinstance(scaled._operands[0], type(K + K)) else 1.0
            torch.testing.assert_close(grad.double(), factor * (Kd @ v).sum())


def test_composition_errors(operators):
    K = make()
    G = operators["G"]
    with pytest.raises(ValueError, match="same parameters"):
        K + G
    with pytest.raises(ValueError, match="same parameters"):
        G @ K
    with pytest.raises(TypeError):
        K + 1.0
    with pytest.raises(TypeError):
        K * K
    with pytest.raises(TypeError, match="0-d real tensor"):
        K * torch.ones(2)
    with pytest.raises(TypeError):
        True * K
    K32 = make(dtype=torch.float32)
    with pytest.raises(ValueError, match="same parameters"):
        K + K32


def test_composition_keeps_refusing_transforms(operators):
    G = operators["G"]
    with pytest.raises(TypeError, match="cannot run inside"):
        torch.func.vmap(lambda x: (G + 2.0 * G) @ x)(torch.ones(2, G.shape[0], dtype=F64))


def test_no_warning_on_products(K):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        K.inverse(0.1) @ randv(K.shape[0])


# -- end to end with real factors (KFACOperator / EKFACOperator of helper "kfac") ------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_single_linear_kfac_is_the_hessian_and_preconditions_exactly(reduction):
    if not hasattr(fc, "KFACOperator"):
        pytest.skip("needs functx.curvature.KFACOperator (issue 17, the factors)")
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(F64)
    X, y = torch.randn(11, 4, dtype=F64), torch.randn(11, 3, dtype=F64)
    data = [(X[:6], y[:6]), (X[6:], y[6:])]
    loss, params = nn.MSELoss(reduction=reduction), dict(model.named_parameters())
    H = fc.HessianOperator(model, loss, params, data)
    K = fc.KFACOperator(model, loss, params, data, fisher="type-2", joint_bias=True)
    E = fc.EKFACOperator(model, loss, params, data, fisher="type-2", joint_bias=True)
    Hd = H.to_dense()
    assert list(K.blocks) == ["weight"] and K.blocks["weight"].params == ("weight", "bias")
    torch.testing.assert_close(K.to_dense(), Hd)
    torch.testing.assert_close(E.to_dense(), Hd)
    delta = 1e-2
    Hi = torch.linalg.inv(Hd + delta * eye_like(Hd))
    for op in (K, E):
        torch.testing.assert_close(op.inverse(delta).to_dense(), Hi)
        torch.testing.assert_close(op.logdet(delta), torch.linalg.slogdet(Hd + delta * eye_like(Hd))[1])
        torch.testing.assert_close(op.trace(), Hd.trace())
        torch.testing.assert_close(op.diagonal(), Hd.diagonal())
    v = randv(Hd.shape[0])
    pre = fc.InverseOperator(H, damping=delta, preconditioner=K.inverse(delta))
    torch.testing.assert_close(pre @ v, Hi @ v)
    assert pre.converged and pre.num_steps == 1
    plain = fc.InverseOperator(H, damping=delta)
    torch.testing.assert_close(plain @ v, Hi @ v)
    assert plain.num_steps > 1
