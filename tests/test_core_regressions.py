"""Regression tests of the core: tree_norm's range, resolved results, tree structures
compared by what they are, the flat fast paths against torch.func, the caches."""

import optree
import pytest
import torch
from helpers import assert_tree_allclose

import functx
from functx import _torch_internals
from functx._tree import flatten_like, same_structure, tree_flatten


# -- tree_norm: no overflow, no underflow (LAPACK nrm2 scaling) --------------------------
@pytest.mark.parametrize(
    ("a", "b", "dtype", "expected"),
    [
        (3e200, 4e200, torch.float64, 5e200),
        (3e-30, 4e-30, torch.float32, 5e-30),
        (3e-200, 4e-200, torch.float64, 5e-200),
    ],
)
def test_tree_norm_neither_overflows_nor_underflows(a, b, dtype, expected):
    for tree in (
        torch.tensor([a, b], dtype=dtype),
        {"a": torch.tensor([a], dtype=dtype), "b": torch.tensor(b, dtype=dtype)},
    ):
        norm = functx.tree_norm(tree)
        assert norm.dtype == dtype
        assert torch.isfinite(norm) and norm > 0
        torch.testing.assert_close(norm, torch.tensor(expected, dtype=dtype), rtol=1e-6, atol=0)


def test_tree_norm_is_differentiable_and_vmappable():
    x = {"a": torch.tensor([3.0, 0.0], dtype=torch.float64), "b": torch.tensor(4.0, dtype=torch.float64)}
    g = functx.grad(functx.tree_norm)(x)
    assert_tree_allclose(
        g, {"a": torch.tensor([0.6, 0.0], dtype=torch.float64), "b": torch.tensor(0.8, dtype=torch.float64)}
    )
    H = functx.hessian(lambda v: functx.tree_norm(v))(torch.tensor([3.0, 4.0], dtype=torch.float64))
    v = torch.tensor([3.0, 4.0], dtype=torch.float64)
    expected = (torch.eye(2, dtype=torch.float64) - torch.outer(v, v) / 25) / 5  # (I - u u^T) / |v|
    torch.testing.assert_close(H, expected)
    batch = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1e-30, 0.0]])
    torch.testing.assert_close(functx.vmap(functx.tree_norm)(batch), torch.tensor([5.0, 0.0, 1e-30]))
    compiled = torch.compile(functx.tree_norm, fullgraph=True)
    torch.testing.assert_close(compiled(torch.tensor([3e-30, 4e-30])), torch.tensor(5e-30))


def test_tree_norm_keeps_edge_cases():
    assert functx.tree_norm({"a": torch.zeros(2)}).item() == 0.0
    assert functx.tree_norm({"a": torch.zeros(0), "b": torch.tensor([3.0, 4.0])}).item() == pytest.approx(5.0)
    assert functx.tree_norm(torch.tensor([float("inf"), 1.0])).item() == float("inf")
    assert torch.isnan(functx.tree_norm(torch.tensor([float("nan"), 1.0])))
    z = functx.tree_norm(torch.tensor([3 + 4j, 0j], dtype=torch.complex128))
    assert z.dtype == torch.float64 and z.item() == pytest.approx(5.0)


# -- every returned tensor is resolved (no lazy conj/neg bit) ----------------------------
def test_results_carry_no_lazy_bits():
    z = torch.tensor([1.0 + 2.0j, -0.5 + 0.25j], dtype=torch.complex128)
    f = lambda z: z**2 + z.conj().conj()
    expected = torch.diag(2 * z + 1)
    for jac in (functx.jacrev(f, holomorphic=True)(z), functx.jacfwd(f, holomorphic=True)(z)):
        assert not jac.is_conj() and not jac.is_neg()
        jac.numpy()  # raises for a tensor with the conj bit set
        torch.testing.assert_close(jac, expected)
    H = functx.hessian(lambda z: (z**3).sum(), holomorphic=True)(z)
    assert not H.is_conj()
    torch.testing.assert_close(H, torch.diag(6 * z))
    (ct,) = functx.vjp(lambda z: z.conj(), z)[1](torch.ones(2, dtype=torch.complex128))
    assert not ct.is_conj()
    ct.numpy()
    _, t = functx.jvp(lambda z: z.conj(), (z,), (torch.ones(2, dtype=torch.complex128),))
    assert not t.is_conj() and not t.is_neg()
    t.numpy()


# -- tree structures are compared by what they are ---------------------------------------
def _polyfill_leaf_spec():
    """The spec Dynamo's optree polyfill builds for a leaf across a graph break (its repr
    spells the empty namespace: ``PyTreeSpec(*, namespace='')``)."""
    pytree = pytest.importorskip("torch._dynamo.polyfills.pytree")
    return pytree.PyTreeSpec((), None, None, (), None, none_is_leaf=False, namespace="")


def test_flatten_like_accepts_both_spellings_of_an_empty_namespace():
    polyfill = _polyfill_leaf_spec()
    native = optree.tree_structure(torch.ones(()))
    assert repr(polyfill) == "PyTreeSpec(*, namespace='')" and repr(native) == "PyTreeSpec(*)"
    assert same_structure(polyfill, native) and same_structure(native, polyfill)
    _, spec = tree_flatten(torch.ones(2))
    assert same_structure(spec, polyfill)
    assert flatten_like(torch.ones(2), polyfill, [torch.ones(2)], name="cotangents", api="vjp")[0].shape == (2,)


def test_same_structure_still_tells_trees_apart():
    a = optree.tree_structure({"a": 1, "b": (2, None)}, namespace="functx")
    b = optree.tree_structure({"a": 1, "b": (2, None)})
    assert same_structure(a, b)
    for other in ({"a": 1, "c": (2, None)}, {"a": 1, "b": [2, None]}, {"a": 1, "b": (2, 3)}, (1, (2, None))):
        assert not same_structure(a, optree.tree_structure(other))
    assert not same_structure(_polyfill_leaf_spec(), a)
    with pytest.raises(ValueError, match="same tree structure"):
        flatten_like((torch.ones(1),), a, [None, None], name="tangents", api="jvp")


# -- the flat fast paths give torch.func's numbers, and the caches do not leak -----------
def test_flat_paths_match_torch_func_nested():
    assert _torch_internals.flat_ok()
    g = torch.Generator().manual_seed(0)
    p = {
        "w": torch.randn(3, 2, dtype=torch.float64, generator=g),
        "b": torch.randn(2, dtype=torch.float64, generator=g),
    }
    x = torch.randn(5, 3, dtype=torch.float64, generator=g)
    loss = lambda p, x: (torch.tanh(x @ p["w"] + p["b"]) ** 2).sum()
    tf = torch.func
    pairs = [
        (functx.vmap(functx.grad(loss), in_dims=(None, 0)), tf.vmap(tf.grad(loss), in_dims=(None, 0))),
        (functx.vmap(functx.vmap(functx.grad(loss), in_dims=(None, 0)), in_dims=(None, 0)), None),
        (functx.vmap(functx.jacfwd(loss), in_dims=(None, 0)), tf.vmap(tf.jacfwd(loss), in_dims=(None, 0))),
        (functx.grad(loss), tf.grad(loss)),
        (functx.grad(loss, argnums=(0, 1)), tf.grad(loss, argnums=(0, 1))),
    ]
    for ours, theirs in pairs:
        if theirs is None:
            xs = x[None].expand(2, 5, 3)
            ref = tf.vmap(tf.vmap(tf.grad(loss), in_dims=(None, 0)), in_dims=(None, 0))(p, xs)
            assert_tree_allclose(ours(p, xs), ref)
        else:
            assert_tree_allclose(ours(p, x), theirs(p, x))
    # grad of grad, vmap of jvp: the levels nest
    gg = functx.grad(lambda x: functx.grad(lambda y: (y**3).sum())(x).sum())(x[0])
    torch.testing.assert_close(gg, 6 * x[0])
    out = functx.vmap(lambda t: functx.jvp(torch.sin, (x[0],), (t,))[1])(x)
    torch.testing.assert_close(out, torch.cos(x[0]) * x)


def test_vmap_out_dims_none_refuses_a_batched_output():
    with pytest.raises(ValueError, match="out_dims"):
        functx.vmap(lambda x: x * 2, out_dims=None)(torch.ones(3, 2))
    # an unbatched output with out_dims=None is fine
    torch.testing.assert_close(
        functx.vmap(lambda x: (x, torch.ones(2)), out_dims=(0, None))(torch.ones(3))[1], torch.ones(2)
    )


def test_vmap_structure_cache_keeps_bool_dims_apart():
    x = torch.ones(3, 2)
    functx.vmap(lambda a, b: a + b, in_dims=(0, 0))(x, x)
    with pytest.raises(TypeError, match="ints or None"):
        functx.vmap(lambda a, b: a + b, in_dims=(False, 0))(x, x)
