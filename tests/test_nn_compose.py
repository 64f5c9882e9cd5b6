"""functx.nn composed with the transforms: per-sample gradients and Hessians, vmap(hvp),
MAML grad(grad), ensembles, tied and parametrized weights, RNNs and attention.

Every reference is independent of functx: plain autograd on deepcopies of the real
module, or ``torch.autograd.functional`` on a closed-form version of the model, in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_tree_allclose, check_grads
from test_nn import Symmetric, TiedLM, parametrized_net
from torch import nn
from torch.nn.utils import parametrize

import functx
import functx.nn as fnn

D = torch.float64
NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(D)


def closed_form(p: dict, x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ p["0.weight"].T + p["0.bias"]) @ p["2.weight"].T + p["2.bias"]


def flat(tree: dict) -> torch.Tensor:
    return torch.cat([tree[n].reshape(-1) for n in NAMES])


def unflat(theta: torch.Tensor, like: dict) -> dict:
    sizes = [like[n].numel() for n in NAMES]
    return {n: t.reshape(like[n].shape) for n, t in zip(NAMES, torch.split(theta, sizes))}


def sq(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).sum()


def data(n: int = 6):
    return torch.randn(n, 3, dtype=D), torch.randn(n, 2, dtype=D)


def grads_of(module: nn.Module, loss) -> dict:
    """Plain autograd on a deepcopy: ``{name: .grad}``."""
    ref = copy.deepcopy(module)
    loss(ref).backward()
    return {n: p.grad for n, p in ref.named_parameters()}


def test_check_grads_through_fmodel():
    fmodel, params, buffers = fnn.make_functional(mlp())
    x, _ = data(4)
    check_grads(lambda p: fmodel(p, buffers, x), (params,), order=2)


def test_per_sample_grads_match_autograd_loop():
    model = mlp()
    fmodel, params, buffers = fnn.make_functional(model)
    x, y = data()
    loss = lambda p, b, xi, yi: sq(fmodel(p, b, xi), yi)
    grads = functx.vmap(functx.grad(loss), in_dims=(None, None, 0, 0))(params, buffers, x, y)
    expected = [grads_of(model, lambda m: sq(m(x[i]), y[i])) for i in range(len(x))]
    assert_tree_allclose(grads, {n: torch.stack([e[n] for e in expected]) for n in NAMES}, rtol=1e-10, atol=1e-12)


def hessian_reference(params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.stack(
        [
            torch.autograd.functional.hessian(lambda th: sq(closed_form(unflat(th, params), x[i]), y[i]), flat(params))
            for i in range(len(x))
        ]
    )


def test_per_sample_hessians_match_autograd_functional_loop():
    fmodel, params, buffers = fnn.make_functional(mlp())
    x, y = data(4)
    loss = lambda p, xi, yi: sq(fmodel(p, buffers, xi), yi)
    H = functx.vmap(functx.hessian(loss), in_dims=(None, 0, 0))(params, x, y)
    n = len(x)
    rows = [torch.cat([H[a][b].reshape(n, params[a].numel(), params[b].numel()) for b in NAMES], 2) for a in NAMES]
    torch.testing.assert_close(torch.cat(rows, 1), hessian_reference(params, x, y), rtol=1e-10, atol=1e-12)


def test_vmap_hvp_matches_reference_hessian():
    fmodel, params, buffers = fnn.make_functional(mlp())
    x, y = data(4)
    V = torch.randn(len(x), flat(params).numel(), dtype=D)
    tangents = {
        n: t
        for n, t in zip(
            NAMES,
            [
                v.reshape(len(x), *params[n].shape)
                for v, n in zip(torch.split(V, [params[n].numel() for n in NAMES], 1), NAMES)
            ],
        )
    }

    def hvp_one(xi, yi, vi):
        grads, (hv,) = functx.hvp(lambda p: sq(fmodel(p, buffers, xi), yi), (params,), (vi,))
        return hv

    Hv = functx.vmap(hvp_one)(x, y, tangents)
    expected = torch.einsum("bij,bj->bi", hessian_reference(params, x, y), V)
    torch.testing.assert_close(
        torch.stack([flat({n: Hv[n][i] for n in NAMES}) for i in range(len(x))]), expected, rtol=1e-10, atol=1e-12
    )


def test_maml_grad_of_grad_matches_autograd():
    fmodel, params, buffers = fnn.make_functional(mlp())
    alpha = 0.1
    tasks = [data(5) + data(5) for _ in range(3)]
    XS, YS, XQ, YQ = (torch.stack([t[k] for t in tasks]) for k in range(4))

    def task_loss(p, x, y):
        return ((fmodel(p, buffers, x) - y) ** 2).mean()

    def maml_loss(p, xs, ys, xq, yq):
        g = functx.grad(task_loss)(p, xs, ys)
        adapted = {k: p[k] - alpha * g[k] for k in p}
        return task_loss(adapted, xq, yq)

    meta = functx.vmap(functx.grad(maml_loss), in_dims=(None, 0, 0, 0, 0))(params, XS, YS, XQ, YQ)
    for i, (xs, ys, xq, yq) in enumerate(tasks):
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        inner = ((closed_form(leaves, xs) - ys) ** 2).mean()
        g = torch.autograd.grad(inner, [leaves[k] for k in NAMES], create_graph=True)
        adapted = {k: leaves[k] - alpha * gk for k, gk in zip(NAMES, g)}
        outer = ((closed_form(adapted, xq) - yq) ** 2).mean()
        expected = torch.autograd.grad(outer, [leaves[k] for k in NAMES])
        assert_tree_allclose({k: meta[k][i] for k in NAMES}, dict(zip(NAMES, expected)), rtol=1e-10, atol=1e-12)


def test_ensemble_grads_via_stack():
    members = [mlp() for _ in range(3)]
    for i, m in enumerate(members):
        with torch.no_grad():
            m[0].weight.add_(i)
    fmodel, params, buffers = fnn.stack(members)
    x, y = data()
    loss = lambda p, b: sq(fmodel(p, b, x), y)
    grads = functx.vmap(functx.grad(loss), in_dims=(0, 0))(params, buffers)
    expected = [grads_of(m, lambda r: sq(r(x), y)) for m in members]
    assert_tree_allclose(grads, {n: torch.stack([e[n] for e in expected]) for n in NAMES}, rtol=1e-10, atol=1e-12)


def test_cnn_batchnorm_eval_per_sample_grads():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2)).to(D).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    fmodel, params, buffers = fnn.make_functional(model)
    x, y = torch.randn(3, 2, 6, 6, dtype=D), torch.randn(3, 2, dtype=D)
    loss = lambda p, b, xi, yi: sq(fmodel(p, b, xi[None]), yi[None])
    grads = functx.vmap(functx.grad(loss), in_dims=(None, None, 0, 0))(params, buffers, x, y)
    expected = [grads_of(model, lambda m: sq(m(x[i : i + 1]), y[i : i + 1])) for i in range(3)]
    assert_tree_allclose(grads, {n: torch.stack([e[n] for e in expected]) for n in grads}, rtol=1e-10, atol=1e-12)


def test_tied_gradient_sums_both_uses():
    torch.manual_seed(0)
    model = TiedLM().to(D)
    fmodel, params, buffers = fnn.make_functional(model)
    tokens, targets = torch.randint(0, 10, (4, 3)), torch.randn(4, 3, 10, dtype=D)
    grads = functx.grad(lambda p: sq(fmodel(p, buffers, tokens), targets))(params)
    expected = grads_of(model, lambda m: sq(m(tokens), targets))
    assert list(grads) == ["embed.weight"]
    torch.testing.assert_close(grads["embed.weight"], expected["embed.weight"], rtol=1e-10, atol=1e-12)
    # both uses contribute: the decoder's use alone gives a different gradient
    decoder_only = functx.grad(lambda w: sq(torch.tanh(params["embed.weight"][tokens]) @ w.T, targets))(
        params["embed.weight"]
    )
    assert (decoder_only - grads["embed.weight"]).abs().max() > 1e-3


def test_parametrized_gradient_matches_autograd():
    model = parametrized_net()
    fmodel, params, buffers = fnn.make_functional(model)
    x, y = torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D)
    grads = functx.grad(lambda p: sq(fmodel(p, buffers, x), y))(params)
    expected = grads_of(model, lambda m: sq(m(x), y))
    assert_tree_allclose(grads, expected, rtol=1e-9, atol=1e-11)
    assert isinstance(model[0].parametrizations.weight[0], Symmetric) and parametrize.is_parametrized(model[2])


def test_lstm_grad_and_hessian_vector_product():
    # (torch.vmap has no batching rule for aten::lstm, so no per-sample version here)
    torch.manual_seed(0)
    model = nn.LSTM(3, 4, num_layers=2, batch_first=True).to(D)
    fmodel, params, buffers = fnn.make_functional(model)
    x = torch.randn(2, 5, 3, dtype=D)
    head = lambda out: (out[0][:, -1] ** 2).sum() + out[1][1].sum()
    grads = functx.grad(lambda p: head(fmodel(p, buffers, x)))(params)
    assert_tree_allclose(grads, grads_of(model, lambda m: head(m(x))), rtol=1e-10, atol=1e-12)
    v = {k: torch.randn_like(t) for k, t in params.items()}
    _, (hv,) = functx.hvp(lambda p: head(fmodel(p, buffers, x)), (params,), (v,))
    eps = 1e-6  # central differences of the gradient along v
    shifted = [
        functx.grad(lambda p: head(fmodel(p, buffers, x)))({k: params[k] + s * v[k] for k in params})
        for s in (eps, -eps)
    ]
    assert_tree_allclose(hv, {k: (shifted[0][k] - shifted[1][k]) / (2 * eps) for k in hv}, rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_transformer_per_sample_grads():
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True).to(D)
    fmodel, params, buffers = fnn.make_functional(model)
    x = torch.randn(3, 5, 4, dtype=D)
    head = lambda out: (out**2).sum()
    loss = lambda p, xi: head(fmodel(p, buffers, xi[None]))
    grads = functx.vmap(functx.grad(loss), in_dims=(None, 0))(params, x)
    expected = [grads_of(model, lambda m: head(m(x[i : i + 1]))) for i in range(len(x))]
    assert_tree_allclose(grads, {n: torch.stack([e[n] for e in expected]) for n in grads}, rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------------------------------
# A train-mode BatchNorm under vmap: functx's hint instead of torch's raw error.


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(torch.float64)


BN_HINT = (
    r"`functx.nn.FunctionalModule.(__call__|stateful)`: normalization layer\(s\) '1' run in training mode "
    r"under `vmap`.*`model.eval\(\)`.*`functx.nn.make_functional\(model, training=False\)`.*"
    r"`fmodel.with_training\(False\)`.*Per-sample BatchNorm"
)


def bn_calls(fmodel, params, buffers, x):
    """Compositions a user writes with a train-mode BatchNorm; each must raise the hint."""
    return {
        "vmap(call)": lambda: functx.vmap(lambda xi: fmodel(params, buffers, xi))(x),
        "vmap(stateful)": lambda: functx.vmap(lambda xi: fmodel.stateful(params, buffers, xi))(x),
        "grad(vmap)": lambda: functx.grad(
            lambda p: functx.vmap(lambda xi: fmodel.stateful(p, buffers, xi)[0])(x).sum()
        )(params),
        "vmap(grad)": lambda: functx.vmap(
            lambda xi: functx.grad(lambda p: fmodel.stateful(p, buffers, xi)[0].sum())(params)
        )(x),
    }


@pytest.mark.parametrize("call", ["vmap(call)", "vmap(stateful)", "grad(vmap)", "vmap(grad)"])
@pytest.mark.parametrize("how", ["module flag", "training=True"])
def test_train_mode_batchnorm_under_vmap_names_the_fix(call, how):
    model = bn_model()
    fmodel, params, buffers = fnn.make_functional(model, training=True if how == "training=True" else None)
    x = torch.randn(6, 5, 3, dtype=torch.float64)
    before = {k: v.clone() for k, v in buffers.items()}
    with pytest.raises(ValueError, match=BN_HINT) as info:
        bn_calls(fmodel, params, buffers, x)[call]()
    assert isinstance(info.value.__cause__, RuntimeError)  # torch's own error stays attached
    assert_tree_allclose(buffers, before)
    # The fix the hint names works and agrees with the module in eval mode.
    model.eval()
    out = functx.vmap(lambda xi: fmodel.with_training(False)(params, buffers, xi))(x)
    assert_tree_allclose(out, torch.stack([model(xi) for xi in x]))


def test_batchnorm_hint_only_for_the_batchnorm_error():
    """Other RuntimeErrors of a forward with a train-mode BatchNorm pass through as they are;
    a train-mode BatchNorm of an ensemble (stacked buffers) runs under vmap."""

    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    fmodel, params, buffers = fnn.make_functional(nn.Sequential(Boom(), nn.BatchNorm1d(3)).to(torch.float64))
    with pytest.raises(RuntimeError, match=r"^boom$"):
        functx.vmap(lambda xi: fmodel.stateful(params, buffers, xi))(torch.randn(2, 4, 3, dtype=torch.float64))
    members = [bn_model() for _ in range(3)]
    fmodel, params, buffers = fnn.stack(members)
    x = torch.randn(5, 3, dtype=torch.float64)
    out, new = functx.vmap(fmodel.stateful, in_dims=(0, 0, None))(params, buffers, x)
    for i, m in enumerate(members):
        assert_tree_allclose(out[i], m(x))  # train mode: updates m's running stats, as new[...][i]
        assert_tree_allclose(new["1.running_mean"][i], m[1].running_mean)
