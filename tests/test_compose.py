"""The compositions users write, each against an independent reference (loops over
torch.autograd.functional, closed forms, finite differences)."""

import pytest
import torch
import torch.autograd.functional as AF
from helpers import Params, assert_tree_allclose, fd_jvp, tree_leaves, tree_map

import functx
from functx._tree import tree_flatten, tree_unflatten

D = torch.float64


def mlp_loss(p, x, y):
    h = torch.tanh(x @ p["w1"] + p["b1"])
    return ((h @ p["w2"]).squeeze(-1) - y).pow(2).mean()


@pytest.fixture
def mlp():
    g = torch.Generator().manual_seed(1)
    p = {
        "w1": torch.randn(3, 4, dtype=D, generator=g),
        "b1": torch.randn(4, dtype=D, generator=g),
        "w2": torch.randn(4, 1, dtype=D, generator=g),
    }
    x, y = torch.randn(5, 3, dtype=D, generator=g), torch.randn(5, dtype=D, generator=g)
    return p, x, y


def flat_loss(p, x, y):
    """mlp_loss as a function of a tuple of leaves, for torch.autograd.functional."""
    leaves, spec = tree_flatten(p)
    return spec, lambda *ls: mlp_loss(tree_unflatten(spec, list(ls)), x, y)


def test_grad_of_grad_third_order_closed_form():
    x = torch.tensor(0.7, dtype=D)
    f = lambda x: torch.sin(x) * x**3
    d3 = functx.grad(functx.grad(functx.grad(f)))(x)
    expected = -torch.cos(x) * x**3 - 9 * torch.sin(x) * x**2 + 18 * torch.cos(x) * x + 6 * torch.sin(x)
    torch.testing.assert_close(d3, expected)


def test_jacfwd_of_jacrev_and_all_mixes_equal_hessian(mlp):
    p, x, y = mlp
    H = functx.hessian(mlp_loss)(p, x, y)
    for outer in (functx.jacfwd, functx.jacrev):
        for inner in (functx.jacfwd, functx.jacrev):
            assert_tree_allclose(outer(inner(mlp_loss))(p, x, y), H)
    spec, f = flat_loss(p, x, y)
    leaves = tuple(tree_leaves(p))
    ref = AF.hessian(f, leaves)
    torch.testing.assert_close(H["w1"]["b1"], ref[1][0])  # leaves sorted: b1, w1, w2


@pytest.mark.parametrize("vmap", [functx.vmap, torch.vmap], ids=["functx.vmap", "torch.vmap"])
def test_per_sample_grads_and_hessians_vs_loop(mlp, vmap):
    p, x, y = mlp
    in_dims = (None, 0, 0)
    grads = vmap(functx.grad(mlp_loss), in_dims=in_dims)(p, x[:, None], y[:, None])
    hess = vmap(functx.hessian(mlp_loss), in_dims=in_dims)(p, x[:, None], y[:, None])
    for n in range(x.shape[0]):
        spec, f = flat_loss(p, x[n : n + 1], y[n : n + 1])
        leaves = tuple(tree_leaves(p))
        g_ref = tree_unflatten(spec, list(AF.jacobian(f, leaves)))
        assert_tree_allclose(tree_map(lambda t: t[n], grads), g_ref)
        H_ref = AF.hessian(f, leaves)
        torch.testing.assert_close(hess["w1"]["w2"][n], H_ref[1][2])
        torch.testing.assert_close(hess["b1"]["b1"][n], H_ref[0][0])


def test_vmap_hvp_and_vmap_jacrev(mlp):
    p, x, y = mlp
    vs = tree_map(lambda t: torch.randn((3,) + t.shape, dtype=D), p)
    loss = lambda p: mlp_loss(p, x, y)
    _, (Hv,) = functx.vmap(lambda v: functx.hvp(loss, (p,), (v,)), in_dims=0)(vs)
    spec, f = flat_loss(p, x, y)
    leaves = tuple(tree_leaves(p))
    for k in range(3):
        _, ref = AF.hvp(f, leaves, tuple(tree_leaves(tree_map(lambda t: t[k], vs))))
        assert_tree_allclose(tree_map(lambda t: t[k], Hv), tree_unflatten(spec, list(ref)))
    J = functx.vmap(functx.jacrev(lambda x: torch.tanh(x @ p["w1"])), in_dims=0)(x)
    for n in range(x.shape[0]):
        torch.testing.assert_close(J[n], AF.jacobian(lambda x: torch.tanh(x @ p["w1"]), x[n]))


def test_jvp_of_grad_equals_hvp(mlp):
    p, x, y = mlp
    v = tree_map(torch.randn_like, p)
    loss = lambda p: mlp_loss(p, x, y)
    g, Hv = functx.jvp(functx.grad(loss), (p,), (v,))
    (g2,), (Hv2,) = functx.hvp(loss, (p,), (v,))
    assert_tree_allclose(g, g2)
    assert_tree_allclose(Hv, Hv2)
    assert_tree_allclose(Hv, fd_jvp(functx.grad(loss), (p,), (v,)), rtol=1e-6, atol=1e-7)


def test_grad_of_function_that_calls_vmap(mlp):
    p, x, y = mlp
    per_sample = lambda p: functx.vmap(lambda xi, yi: mlp_loss(p, xi[None], yi[None]))(x, y).mean()
    assert_tree_allclose(functx.grad(per_sample)(p), functx.grad(mlp_loss)(p, x, y))
    assert_tree_allclose(functx.hessian(per_sample)(p), functx.hessian(mlp_loss)(p, x, y))


def test_nested_vmap_of_grad_and_vmap_of_vjp():
    xs = torch.randn(2, 3, 4, dtype=D)
    f = lambda x: (torch.sin(x) * x).sum()
    g = functx.vmap(functx.vmap(functx.grad(f)))(xs)
    torch.testing.assert_close(g, torch.cos(xs) * xs + torch.sin(xs))
    _, vjp_fn = functx.vjp(lambda x: x.sin(), xs[0, 0])
    rows = torch.vmap(vjp_fn)(torch.eye(4, dtype=D))[0]
    torch.testing.assert_close(rows, torch.diag(torch.cos(xs[0, 0])))


def test_torch_func_inside_functx_and_functx_inside_torch_func():
    x = torch.randn(3, dtype=D)
    f = lambda x: (x**4).sum()
    torch.testing.assert_close(functx.grad(lambda x: torch.func.grad(f)(x).sum())(x), 12 * x**2)
    torch.testing.assert_close(torch.func.jacrev(functx.grad(f))(x), torch.diag(12 * x**2))


def test_maml_style_grad_through_inner_sgd_step(mlp):
    p, x, y = mlp

    def adapted_loss(p):
        g = functx.grad(mlp_loss)(p, x[:3], y[:3])
        fast = tree_map(lambda w, gw: w - 0.1 * gw, p, g)
        return mlp_loss(fast, x[3:], y[3:])

    spec, _ = flat_loss(p, x, y)
    leaves = tuple(tree_leaves(p))

    def ref(*ls):
        ws = list(ls)
        q = tree_unflatten(spec, ws)
        inner = mlp_loss(q, x[:3], y[:3])
        gs = torch.autograd.grad(inner, ws, create_graph=True)
        fast = tree_unflatten(spec, [w - 0.1 * gw for w, gw in zip(ws, gs)])
        return mlp_loss(fast, x[3:], y[3:])

    expected = tree_unflatten(spec, list(AF.jacobian(ref, leaves)))
    assert_tree_allclose(functx.grad(adapted_loss)(p), expected)


def test_dataclass_params_under_vmap_grad_and_ensembles():
    w = torch.randn(4, 3, 2, dtype=D)
    b = torch.randn(4, 2, dtype=D)
    ensemble = Params(w=w, b=b, name="ens")
    x = torch.randn(3, dtype=D)
    f = lambda p, x: (torch.tanh(x @ p.w + p.b) ** 2).sum()
    grads = functx.vmap(functx.grad(f), in_dims=(0, None))(ensemble, x)
    assert isinstance(grads, Params) and grads.name == "ens"
    for k in range(4):
        ref = AF.jacobian(lambda w, b: f(Params(w, b), x), (w[k], b[k]))
        torch.testing.assert_close(grads.w[k], ref[0])
        torch.testing.assert_close(grads.b[k], ref[1])


def test_jvp_vjp_adjoint_identity_under_vmap():
    A = torch.randn(3, 4, 4, dtype=D)
    f = lambda A, x: torch.tanh(A @ x)
    x = torch.randn(3, 4, dtype=D)
    t, c = torch.randn(3, 4, dtype=D), torch.randn(3, 4, dtype=D)
    tout = functx.vmap(lambda A, x, t: functx.jvp(lambda x: f(A, x), (x,), (t,))[1])(A, x, t)
    vc = functx.vmap(lambda A, x, c: functx.vjp(lambda x: f(A, x), x)[1](c)[0])(A, x, c)
    torch.testing.assert_close((t * vc).sum(-1), (tout * c).sum(-1))


def _transforms():
    """Every transform as a function (p, x) -> pytree, differentiating w.r.t. p."""
    f = lambda p, x: (torch.tanh(p["w"] @ x) ** 2).sum() + (p["b"] * x[:2]).prod()
    vec = lambda p, x: {"y": torch.tanh(p["w"] @ x) * p["b"].sum()}
    ones = lambda p: tree_map(torch.ones_like, p)
    cases = {
        "grad": lambda p, x: functx.grad(f)(p, x),
        "value_and_grad": lambda p, x: functx.value_and_grad(f)(p, x),
        "jacrev": lambda p, x: functx.jacrev(vec)(p, x),
        "jacfwd": lambda p, x: functx.jacfwd(vec)(p, x),
        "jacfwd-chunked": lambda p, x: functx.jacfwd(vec, chunk_size=2)(p, x),
        "vjp": lambda p, x: functx.vjp(lambda p: vec(p, x), p)[1]({"y": torch.ones(2, dtype=D)}),
        "jvp": lambda p, x: functx.jvp(lambda p: vec(p, x), (p,), (ones(p),)),
        "linearize": lambda p, x: functx.linearize(lambda p: vec(p, x), p)[1](ones(p)),
    }
    for mode in ("rev-rev", "fwd-rev"):
        cases[f"hessian-{mode}"] = lambda p, x, m=mode: functx.hessian(f, mode=m)(p, x)
    for mode in ("rev-rev", "fwd-rev", "rev-fwd"):
        cases[f"hvp-{mode}"] = lambda p, x, m=mode: functx.hvp(lambda p: f(p, x), (p,), (ones(p),), mode=m)
    return cases


TRANSFORMS = _transforms()


@pytest.mark.parametrize("vmap", [functx.vmap, torch.vmap], ids=["functx.vmap", "torch.vmap"])
@pytest.mark.parametrize("batched", ["data", "params"])
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_vmap_of_every_transform_matches_loop(name, batched, vmap):
    g = torch.Generator().manual_seed(3)
    transform = TRANSFORMS[name]
    p = {"w": torch.randn(2, 3, dtype=D, generator=g), "b": torch.randn(2, dtype=D, generator=g)}
    x = torch.randn(4, 3, dtype=D, generator=g)
    if batched == "data":
        out = vmap(transform, in_dims=(None, 0))(p, x)
        expected = [transform(p, x[n]) for n in range(4)]
    else:
        ps = tree_map(lambda t: torch.stack([t * (1 + 0.1 * n) for n in range(4)]), p)
        out = vmap(transform, in_dims=(0, None))(ps, x[0])
        expected = [transform(tree_map(lambda t: t[n], ps), x[0]) for n in range(4)]
    for n in range(4):
        assert_tree_allclose(tree_map(lambda t: t[n], out), expected[n])
