"""Each transform against an independent float64 reference, on tensors and on every pytree kind."""

import pytest
import torch
import torch.autograd.functional as AF
import torch.nn.functional as F
from helpers import (
    Params,
    assert_tree_allclose,
    check_grads,
    fd_grad,
    fd_jvp,
    randn_like_tree,
    tree_catalogue,
    tree_leaves,
    tree_map,
)

import functx
from functx._tree import tree_flatten, tree_unflatten

CATALOGUE = list(tree_catalogue())
D = torch.float64


def scalar_fn(tree):
    """A smooth scalar function coupling every leaf of a pytree."""
    leaves = tree_leaves(tree)
    total = sum((torch.sin(leaf) * leaf**2).sum() for leaf in leaves)
    coupling = sum(leaf.sum() for leaf in leaves)
    return total + torch.tanh(coupling) ** 2


def vector_fn(tree):
    """A pytree-valued function with mixed output shapes."""
    leaves = tree_leaves(tree)
    s = sum(leaf.sum() for leaf in leaves)
    return {"sq": [leaf**2 * s for leaf in leaves], "total": torch.exp(-(s**2))}


def as_tuple_fn(f, spec):
    """f on a pytree as a function of flat leaves, for torch.autograd.functional."""
    return lambda *leaves: f(tree_unflatten(spec, list(leaves)))


def ref_grad(f, tree):
    leaves, spec = tree_flatten(tree)
    jac = AF.jacobian(as_tuple_fn(f, spec), tuple(leaves))
    return tree_unflatten(spec, list(jac))


def ref_hessian_blocks(f, tree):
    leaves, spec = tree_flatten(tree)
    return leaves, spec, AF.hessian(as_tuple_fn(f, spec), tuple(leaves))


@pytest.mark.parametrize("name", CATALOGUE)
def test_grad_matches_autograd_functional(name):
    tree = tree_catalogue()[name]
    assert_tree_allclose(functx.grad(scalar_fn)(tree), ref_grad(scalar_fn, tree))


def test_grad_matches_finite_differences():
    x = torch.randn(4, dtype=torch.float64)
    f = lambda x: torch.logsumexp(x * x.roll(1), 0) + x.prod()
    torch.testing.assert_close(functx.grad(f)(x), fd_grad(f, x), rtol=1e-7, atol=1e-8)


def test_value_and_grad_argnums_tuple_and_aux():
    trees = tree_catalogue()
    p, q = trees["dict"], trees["dataclass"]

    def f(p, label, q, scale=2.0):
        value = scale * (scalar_fn(p) * scalar_fn(q))
        return value, {"label": label, "p": p["b"] * 1, "n": 3}

    (value, aux), (gp, gq) = functx.value_and_grad(f, argnums=(0, 2), has_aux=True)(p, "tag", q, scale=3.0)
    torch.testing.assert_close(value, 3.0 * scalar_fn(p) * scalar_fn(q))
    assert aux["label"] == "tag" and aux["n"] == 3
    torch.testing.assert_close(aux["p"], p["b"])
    assert_tree_allclose(gp, ref_grad(lambda t: f(t, "x", q, scale=3.0)[0], p))
    assert_tree_allclose(gq, ref_grad(lambda t: f(p, "x", t, scale=3.0)[0], q))
    assert gq.name == "layer"  # static dataclass fields survive


def test_grad_negative_argnums_and_non_tensor_arguments():
    x = torch.randn(3, dtype=torch.float64)
    module = torch.nn.Linear(2, 2)
    f = lambda flag, mod, name, none, x: (x**3).sum() if flag else x.sum()
    g = functx.grad(f, argnums=-1)(True, module, "s", None, x)
    torch.testing.assert_close(g, 3 * x**2)


def test_grad_none_subtree_and_dict_order_preserved():
    p = {"z": torch.ones(2, dtype=torch.float64), "a": None, "m": (torch.ones(1, dtype=torch.float64), None)}
    g = functx.grad(lambda p: (p["z"] * 2).sum() + p["m"][0].sum())(p)
    assert list(g) == ["z", "a", "m"] and g["a"] is None and g["m"][1] is None
    torch.testing.assert_close(g["z"], torch.full((2,), 2.0, dtype=torch.float64))


def test_grad_unused_input_is_zero():
    g = functx.grad(lambda p: p["used"].sum())({"used": torch.ones(2), "unused": torch.ones(3)})
    torch.testing.assert_close(g["unused"], torch.zeros(3))


@pytest.mark.parametrize("name", CATALOGUE)
def test_vjp_and_jvp_check_grads(name):
    tree = tree_catalogue()[name]
    check_grads(vector_fn, (tree,), order=2)


def test_vjp_jvp_multiple_primals_and_aux():
    x, y = torch.randn(3, dtype=torch.float64), {"k": torch.randn(2, dtype=torch.float64)}
    f = lambda x, y: ((x * y["k"].sum(), torch.cos(x)), ["meta", x.mean()])
    out, vjp_fn, aux = functx.vjp(f, x, y, has_aux=True)
    assert aux[0] == "meta"
    cot = (torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64))
    gx, gy = vjp_fn(cot)
    tx, ty = torch.randn(3, dtype=torch.float64), {"k": torch.randn(2, dtype=torch.float64)}
    out2, tout, aux2 = functx.jvp(f, (x, y), (tx, ty), has_aux=True)
    assert_tree_allclose(out, out2)
    torch.testing.assert_close(aux2[1], x.mean())
    # adjoint identity and finite differences
    lhs = (gx * tx).sum() + (gy["k"] * ty["k"]).sum()
    rhs = sum((a * b).sum() for a, b in zip(tout, cot))
    torch.testing.assert_close(lhs, rhs)
    assert_tree_allclose(tout, fd_jvp(lambda x, y: f(x, y)[0], (x, y), (tx, ty)), rtol=1e-7, atol=1e-8)


def test_vjp_fn_reusable_and_vmappable():
    x = torch.randn(4, dtype=torch.float64)
    out, vjp_fn = functx.vjp(lambda x: torch.tanh(x) * x.sum(), x)
    eye = torch.eye(4, dtype=torch.float64)
    rows = functx.vmap(vjp_fn)(eye)[0]
    torch.testing.assert_close(rows, AF.jacobian(lambda x: torch.tanh(x) * x.sum(), x))
    torch.testing.assert_close(vjp_fn(eye[0])[0], rows[0])


def test_linearize_matches_jvp_and_vmaps_over_tangents():
    tree = tree_catalogue()["nested"]
    out, jvp_fn, aux = functx.linearize(lambda t: (vector_fn(t), "aux"), tree, has_aux=True)
    assert aux == "aux"
    assert_tree_allclose(out, vector_fn(tree))
    t = randn_like_tree(tree)
    assert_tree_allclose(jvp_fn(t), functx.jvp(vector_fn, (tree,), (t,))[1])
    batch = tree_map(lambda leaf: torch.stack([leaf, 2 * leaf, -leaf]), t)
    batched = functx.vmap(jvp_fn)(batch)
    assert_tree_allclose(tree_map(lambda b: b[1], batched), tree_map(lambda a: 2 * a, jvp_fn(t)))


@pytest.mark.parametrize("jac", [functx.jacrev, functx.jacfwd], ids=["jacrev", "jacfwd"])
@pytest.mark.parametrize("chunk_size", [None, 1, 3])
@pytest.mark.parametrize("name", ["tensor", "nested", "dataclass"])
def test_jacobians_match_autograd_functional(jac, chunk_size, name):
    tree = tree_catalogue()[name]
    leaves, spec = tree_flatten(tree)
    J = jac(vector_fn, chunk_size=chunk_size)(tree)
    out_leaves, out_spec = tree_flatten(vector_fn(tree))
    flat_f = lambda *ls: tuple(tree_leaves(vector_fn(tree_unflatten(spec, list(ls)))))
    ref = AF.jacobian(flat_f, tuple(leaves))  # ref[o][i]
    expected = tree_unflatten(out_spec, [tree_unflatten(spec, list(row)) for row in ref])
    assert_tree_allclose(J, expected)


def test_jacobian_argnums_tuple_has_aux_layout():
    x, y = torch.randn(2, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    f = lambda x, y: ({"a": x * y.sum(), "b": y[:2] * x}, "info")
    for jac in (functx.jacrev, functx.jacfwd):
        J, aux = jac(f, argnums=(0, 1), has_aux=True)(x, y)
        assert aux == "info"
        ref = AF.jacobian(lambda x, y: (f(x, y)[0]["a"], f(x, y)[0]["b"]), (x, y))
        for o, key in enumerate(["a", "b"]):
            for i in range(2):
                torch.testing.assert_close(J[key][i], ref[o][i])


@pytest.mark.parametrize("mode", ["auto", "rev-rev", "fwd-rev"])
@pytest.mark.parametrize("name", CATALOGUE)
def test_hessian_matches_autograd_functional(mode, name):
    tree = tree_catalogue()[name]
    H = functx.hessian(scalar_fn, mode=mode)(tree)
    leaves, spec, ref = ref_hessian_blocks(scalar_fn, tree)
    expected = tree_unflatten(spec, [tree_unflatten(spec, list(row)) for row in ref])
    assert_tree_allclose(H, expected)


def test_hessian_closed_form_quadratic_and_chunks():
    A = torch.randn(5, 5, dtype=torch.float64)
    x = torch.randn(5, dtype=torch.float64)
    f = lambda x: 0.5 * x @ A @ x + torch.dot(x, x) ** 2
    expected = 0.5 * (A + A.T) + 4 * torch.dot(x, x) * torch.eye(5, dtype=torch.float64) + 8 * torch.outer(x, x)
    for mode in ("rev-rev", "fwd-rev"):
        for chunk in (None, 1, 2):
            torch.testing.assert_close(functx.hessian(f, mode=mode, chunk_size=chunk)(x), expected)


def test_hessian_nonscalar_output_argnums_and_aux():
    x, y = torch.randn(2, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    f = lambda x, y: (torch.stack([(x**2 * y).sum(), (x * y**3).sum(), x.prod()]), 7)
    H, aux = functx.hessian(f, argnums=(0, 1), has_aux=True)(x, y)
    assert aux == 7
    ref = functx.jacfwd(functx.jacfwd(lambda x, y: f(x, y)[0], argnums=(0, 1)), argnums=(0, 1))(x, y)
    for i in range(2):
        for j in range(2):
            assert H[i][j].shape == (3, 2, 2)
            torch.testing.assert_close(H[i][j], ref[i][j])
    ref_y = AF.jacobian(lambda y: AF.jacobian(lambda y: f(x, y)[0], y, create_graph=True), y)
    torch.testing.assert_close(H[1][1], ref_y)


@pytest.mark.parametrize("mode", ["auto", "rev-rev", "fwd-rev", "rev-fwd"])
@pytest.mark.parametrize("name", ["tensor", "nested", "dataclass", "global_class"])
def test_hvp_matches_dense_hessian(mode, name):
    tree = tree_catalogue()[name]
    v = randn_like_tree(tree)
    (grads,), (Hv,) = functx.hvp(scalar_fn, (tree,), (v,), mode=mode)
    assert_tree_allclose(grads, ref_grad(scalar_fn, tree))
    leaves, spec, ref = ref_hessian_blocks(scalar_fn, tree)
    v_leaves = tree_leaves(v)
    expected = [
        sum((ref[i][j].reshape(leaves[i].numel(), -1) @ v_leaves[j].reshape(-1)) for j in range(len(leaves))).reshape(
            leaves[i].shape
        )
        for i in range(len(leaves))
    ]
    assert_tree_allclose(Hv, tree_unflatten(spec, expected))


@pytest.mark.parametrize("loss", [F.mse_loss, F.huber_loss, F.smooth_l1_loss, F.l1_loss], ids=lambda f: f.__name__)
def test_hvp_works_where_jvp_of_grad_recipe_crashes(loss):
    pred = torch.randn(6, dtype=torch.float64)
    target = torch.randn(6, dtype=torch.float64)
    v = torch.randn(6, dtype=torch.float64)
    f = lambda p: loss(torch.tanh(p) * 3, target)
    (g,), (Hv,) = functx.hvp(f, (pred,), (v,))
    torch.testing.assert_close(g, AF.jacobian(f, pred))
    torch.testing.assert_close(Hv, AF.hessian(f, pred) @ v)
    torch.testing.assert_close(functx.hessian(f)(pred), AF.hessian(f, pred))


def test_hvp_multiple_primals_has_aux():
    x, y = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    tx, ty = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    f = lambda x, y: ((x * y).sum() ** 2 + (x**4).sum(), {"tag": "a"})
    grads, Hv, aux = functx.hvp(f, (x, y), (tx, ty), has_aux=True)
    assert aux == {"tag": "a"}
    Hxx, Hxy = AF.hessian(lambda x, y: f(x, y)[0], (x, y))[0]
    torch.testing.assert_close(Hv[0], Hxx @ tx + Hxy @ ty)
    torch.testing.assert_close(grads[1], 2 * (x * y).sum() * x)


def test_hessian_auto_falls_back_when_forward_ad_is_missing(monkeypatch):
    import functx._hessian as hmod

    monkeypatch.setattr(hmod, "_prefers_rev_rev", lambda leaves: False)  # pretend we are on a GPU
    x, target = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    f = lambda p: F.huber_loss(p * p, target)
    with pytest.raises((NotImplementedError, RuntimeError), match="forward AD"):  # torch's own error
        functx.hessian(f, mode="fwd-rev")(x)
    torch.testing.assert_close(functx.hessian(f)(x), AF.hessian(f, x))


def test_outer_autograd_flows_through_transforms():
    """functx results stay differentiable w.r.t. inputs that require grad (regular autograd)."""
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    g = functx.grad(lambda x: (x**3).sum())(x)
    (gg,) = torch.autograd.grad(g.sum(), x)
    torch.testing.assert_close(gg, 6 * x.detach())


def test_inputs_are_never_mutated():
    p = {"w": torch.randn(3, dtype=torch.float64, requires_grad=True), "b": torch.randn(2, dtype=torch.float64)}
    p["w"].grad = torch.full((3,), 7.0, dtype=torch.float64)
    before = {k: v.detach().clone() for k, v in p.items()}
    f = lambda p: (p["w"] ** 2).sum() * p["b"].sum()
    for transform in (functx.grad, functx.hessian, functx.jacrev, functx.jacfwd):
        transform(f)(p)
    functx.hvp(f, (p,), (tree_map(torch.ones_like, p),))
    functx.vjp(f, p)[1](torch.tensor(1.0, dtype=torch.float64))
    assert p["w"].requires_grad and not p["b"].requires_grad
    torch.testing.assert_close(p["w"].grad, torch.full((3,), 7.0, dtype=torch.float64))
    assert p["b"].grad is None
    assert_tree_allclose({k: v.detach() for k, v in p.items()}, before)


def test_works_under_no_grad_and_float32():
    x = torch.randn(3)
    with torch.no_grad():
        g = functx.grad(lambda x: (x**3).sum())(x)
        H = functx.hessian(lambda x: (x**3).sum())(x)
    torch.testing.assert_close(g, 3 * x**2)
    torch.testing.assert_close(H, torch.diag(6 * x))
    assert g.dtype == torch.float32


def test_empty_differentiated_pytree():
    x = torch.randn(2, dtype=torch.float64)
    f = lambda p, x: (x**2).sum()
    assert functx.grad(f)({}, x) == {}
    assert functx.hessian(f)({}, x) == {}
    assert functx.jacrev(f)({}, x) == {}


def test_dataclass_static_field_and_complex_outputs():
    p = Params(w=torch.randn(2, 2, dtype=torch.float64), b=torch.randn(2, dtype=torch.float64), name="custom")
    g = functx.grad(lambda p: (p.w @ p.b).square().sum())(p)
    assert isinstance(g, Params) and g.name == "custom"
    z = torch.randn(3, dtype=torch.complex128)
    out, vjp_fn = functx.vjp(lambda z: z * z, z)
    (gz,) = vjp_fn(torch.ones(3, dtype=torch.complex128))
    torch.testing.assert_close(gz, 2 * z.conj())


def test_jacfwd_randomness_same_and_error():
    x = torch.randn(3, dtype=D)
    noise = lambda x: x * torch.rand((), dtype=D)
    J = functx.jacfwd(noise, randomness="same")(x)
    assert torch.allclose(J, J[0, 0] * torch.eye(3, dtype=D))
    with pytest.raises(RuntimeError, match="randomness"):  # torch's own error
        functx.jacfwd(noise)(x)
    with pytest.raises(ValueError, match="randomness"):
        functx.jacfwd(noise, randomness="sometimes")


# --------------------------------------------------------------------------------------
# Top-level eager calls of grad/value_and_grad/hvp run plain autograd (faster); everywhere
# else torch.func. Both paths must agree in value and semantics.


@pytest.fixture(params=["plain", "torch.func"])
def engine(request, monkeypatch):
    if request.param == "torch.func":
        import functx._grad
        import functx._hessian

        monkeypatch.setattr(functx._grad, "plain_autograd", lambda *t: False)
        monkeypatch.setattr(functx._hessian, "plain_autograd", lambda *t: False)
    return request.param


def test_both_engines_agree_on_grad_hvp_and_semantics(engine):
    tree = tree_catalogue()["nested"]
    v = randn_like_tree(tree)
    assert_tree_allclose(functx.grad(scalar_fn)(tree), ref_grad(scalar_fn, tree))
    (g,), (Hv,) = functx.hvp(scalar_fn, (tree,), (v,))
    (g2,), (Hv2,) = functx.hvp(scalar_fn, (tree,), (v,), mode="rev-fwd")
    assert_tree_allclose(g, g2)
    assert_tree_allclose(Hv, Hv2)
    for leaf in tree_leaves((g, Hv)):
        assert not leaf.requires_grad and leaf.grad_fn is None
    # unused inputs and constant functions give zeros, under no_grad too
    p = {"used": torch.ones(2, dtype=D), "unused": torch.ones(3, dtype=D)}
    with torch.no_grad():
        (value, aux), grads = functx.value_and_grad(lambda p: ((p["used"] ** 2).sum(), p["used"] * 2), has_aux=True)(p)
        const = functx.grad(lambda p: torch.tensor(1.0, dtype=D))(p)
        (_,), (Hv_const,) = functx.hvp(lambda p: p["used"].sum(), (p,), (p,))
    torch.testing.assert_close(grads["unused"], torch.zeros(3, dtype=D))
    torch.testing.assert_close(grads["used"], 2 * p["used"])
    assert not value.requires_grad and not aux.requires_grad
    torch.testing.assert_close(const["used"], torch.zeros(2, dtype=D))
    torch.testing.assert_close(Hv_const["used"], torch.zeros(2, dtype=D))
    assert not p["used"].requires_grad  # never flipped


def test_grad_and_hvp_in_inference_mode_and_with_outer_graph(engine):
    x = torch.randn(3, dtype=D)
    with torch.inference_mode():
        torch.testing.assert_close(functx.grad(lambda x: (x**3).sum())(x), 3 * x**2)
    w = torch.randn(3, dtype=D, requires_grad=True)
    (g,), (Hv,) = functx.hvp(lambda x: (x**3 * w).sum(), (x,), (torch.ones(3, dtype=D),))
    torch.testing.assert_close(Hv, 6 * x * w.detach())
    (dw,) = torch.autograd.grad(Hv.sum(), w)  # differentiable w.r.t. the captured w
    torch.testing.assert_close(dw, 6 * x)
    xr = x.clone().requires_grad_()
    (_,), (Hv,) = functx.hvp(lambda x: (x**4).sum(), (xr,), (torch.ones(3, dtype=D),))
    (d3,) = torch.autograd.grad(Hv.sum(), xr)  # the input itself is in an outer graph
    torch.testing.assert_close(d3, 24 * x)


def test_captured_tensors_requiring_grad_stay_differentiable(engine):
    """Meta-learning through a top-level functx.grad: d(outer loss)/d(captured lr) flows."""
    lr = torch.tensor(0.1, dtype=D, requires_grad=True)
    w0 = torch.randn(3, dtype=D)
    x, y = torch.randn(5, 3, dtype=D), torch.randn(5, dtype=D)
    inner = lambda w: ((x @ w - y) ** 2).mean()
    (value, aux), g = functx.value_and_grad(lambda w: (inner(w) * (1 + lr), lr * 2), has_aux=True)(w0)
    assert g.requires_grad and value.requires_grad and aux.requires_grad
    w1 = w0 - lr * g
    (dlr,) = torch.autograd.grad(inner(w1), lr)
    ref = AF.jacobian(lambda lr: inner(w0 - lr * (1 + lr) * AF.jacobian(inner, w0)), lr.detach())
    torch.testing.assert_close(dlr, ref)
    # saliency: gradient w.r.t. the input of a model whose weights require grad
    model = torch.nn.Linear(3, 1).double()
    sal = functx.grad(lambda x: model(x).sum())(x)
    torch.testing.assert_close(sal, model.weight.detach().expand(5, 3))
    assert model.weight.grad is None
