"""Behaviour that the documentation states in prose, pinned so that the prose stays true.

Each test names the page and the claim it checks.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import functx
import functx.curvature as fc
from functx import solvers


def _counting_matvec():
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 5.0], dtype=torch.float64))
    calls = {"n": 0}

    def matvec(x):
        calls["n"] += 1
        return A @ x

    return matvec, calls


@pytest.mark.parametrize("solver", ["cg", "minres", "gmres", "bicgstab"])
def test_solvers_stop_early_under_vmap_and_grad(solver):
    # docs/solvers.md ("Early exit") and docs/sharp_bits.md: in eager mode, under vmap and under
    # grad the solvers stop once every lane has converged, not after max_iter iterations.
    matvec, calls = _counting_matvec()
    solve = getattr(solvers, solver)
    b, batch, max_iter = torch.ones(4, dtype=torch.float64), torch.ones(3, 4, dtype=torch.float64), 500
    runs = {
        "eager": lambda: solve(matvec, b, max_iter=max_iter),
        "functx.vmap": lambda: functx.vmap(lambda v: solve(matvec, v, max_iter=max_iter).value)(batch),
        "torch.vmap": lambda: torch.vmap(lambda v: solve(matvec, v, max_iter=max_iter).value)(batch),
        "functx.grad": lambda: functx.grad(lambda v: solve(matvec, v, max_iter=max_iter).value.sum())(b),
        "torch.func.grad": lambda: torch.func.grad(lambda v: solve(matvec, v, max_iter=max_iter).value.sum())(b),
    }
    counts = {}
    for name, run in runs.items():
        calls["n"] = 0
        run()
        counts[name] = calls["n"]
    assert max(counts.values()) < 50, counts  # 4 unknowns: a handful of products, never max_iter
    assert counts["functx.vmap"] == counts["torch.vmap"] <= 2 * counts["eager"], counts


def test_torch_func_jacrev_refuses_complex_inputs_and_vjp_gives_conj_2z():
    # docs/sharp_bits.md ("Complex numbers").
    z = torch.tensor([1.0 + 2.0j, -0.5j], dtype=torch.complex128)
    with pytest.raises(RuntimeError, match="Expected all inputs to be real"):
        torch.func.jacrev(lambda z: z * z)(z)
    with pytest.raises(RuntimeError, match="Expected all inputs to be real"):
        torch.func.jacfwd(lambda z: z * z)(z)
    _, vjp_fn = torch.func.vjp(lambda z: z * z, z)
    torch.testing.assert_close(vjp_fn(torch.ones_like(z))[0], (2 * z).conj())


def test_chunk_size_is_where_the_transforms_page_says():
    # docs/transforms.md: chunk_size on jacrev, jacfwd, hessian and vmap, not on linearize.
    have = {n for n in functx.__all__ if callable(getattr(functx, n)) and _has(getattr(functx, n), "chunk_size")}
    assert {"jacrev", "jacfwd", "hessian", "vmap"} <= have
    assert "linearize" not in have
    assert _has(functx.linearize, "has_aux")


def _has(obj, name: str) -> bool:
    try:
        return name in inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return False


def _model_and_data(n: int = 50):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    data = TensorDataset(torch.randn(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,)))
    return model, dict(model.named_parameters()), data


def test_determinism_check_accepts_shuffle_and_refuses_other_samples_per_pass():
    # docs/curvature.md (`check_deterministic`): shuffle=True alone passes; a loader that yields
    # other samples on each pass (shuffle=True with drop_last=True) is refused.
    model, params, data = _model_and_data()
    H = fc.HessianOperator(model, nn.CrossEntropyLoss(), params, DataLoader(data, batch_size=16, shuffle=True))
    assert H.num_data == 50
    torch.manual_seed(1)
    with pytest.raises(ValueError, match=r"`data`|pass"):
        fc.HessianOperator(
            model, nn.CrossEntropyLoss(), params, DataLoader(data, batch_size=16, shuffle=True, drop_last=True)
        )


def test_batches_weighted_by_size_like_pyhessian():
    # docs/curvature.md (migrating from PyHessian): PyHessian's dataloader_hv_product sums each
    # batch's H_b v times its size and divides by N; HessianOperator gives the same product.
    model, params, data = _model_and_data()
    batches = list(DataLoader(data, batch_size=16))  # 16, 16, 16, 2: uneven
    loss = nn.CrossEntropyLoss()
    H = fc.HessianOperator(model, loss, params, batches)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    total, n = {k: torch.zeros_like(p) for k, p in params.items()}, 0
    leaves = {k: p.detach().requires_grad_() for k, p in params.items()}
    for x, y in batches:  # PyHessian's loop: a double backward per batch, weighted by its size
        grads = torch.autograd.grad(
            loss(torch.func.functional_call(model, leaves, (x,)), y), list(leaves.values()), create_graph=True
        )
        Hv = dict(zip(leaves, torch.autograd.grad(grads, list(leaves.values()), grad_outputs=list(v.values()))))
        total = {k: total[k] + Hv[k] * len(x) for k in total}
        n += len(x)
    expected = {k: t / n for k, t in total.items()}
    got = H @ v
    for k in expected:
        torch.testing.assert_close(got[k], expected[k])
