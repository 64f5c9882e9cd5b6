"""The one flat boundary (functx._tree): flatten_like, the leaf check, ravel_pytree and the
public tree algebra, each against a direct computation."""

import pytest
import torch
from helpers import assert_tree_allclose

import functx
from functx._tree import check_float_leaves, flatten_float, flatten_like, tree_flatten

D = torch.float64


def _tree():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(2, 3, dtype=D, generator=g), "b": (torch.randn(3, dtype=D, generator=g), None)}


def _other():
    g = torch.Generator().manual_seed(1)
    return {"w": torch.randn(2, 3, dtype=D, generator=g), "b": (torch.randn(3, dtype=D, generator=g), None)}


# -- flatten_like ------------------------------------------------------------------------


def test_flatten_like_returns_leaves_in_reference_order():
    x = _tree()
    leaves, spec = tree_flatten(x)
    got = flatten_like(_other(), spec, leaves, name="v", api="api")
    assert [t.shape for t in got] == [t.shape for t in leaves]


def test_flatten_like_structure_is_value_error_with_key_path():
    leaves, spec = tree_flatten(_tree())
    with pytest.raises(ValueError, match=r"`functx.api`: `v` must have the same tree structure as the primals: .*'c'"):
        flatten_like({"w": 1, "c": (2, None)}, spec, leaves, name="v", api="api", ref="the primals")


def test_flatten_like_shape_is_value_error_dtype_and_kind_are_type_errors():
    x = _tree()
    leaves, spec = tree_flatten(x)
    bad_shape = {**x, "w": torch.zeros(3, 2, dtype=D)}
    with pytest.raises(ValueError, match=r"functx.api`: v\['w'\] has shape \(3, 2\) .* \(2, 3\)"):
        flatten_like(bad_shape, spec, leaves, name="v", api="api")
    bad_dtype = {**x, "w": torch.zeros(2, 3)}
    with pytest.raises(TypeError, match=r"v\['w'\] has dtype torch.float32 .*torch.float64"):
        flatten_like(bad_dtype, spec, leaves, name="v", api="api")
    with pytest.raises(TypeError, match=r"out\['w'\] must be a tensor, got a value of type float"):
        flatten_like({**x, "w": 1.0}, spec, leaves, name="v", api="api", root="out")


def test_flatten_like_skips_none_references():
    x = _tree()
    leaves, spec = tree_flatten(x)
    got = flatten_like({**x, "w": "anything"}, spec, [leaves[0], None], name="v", api="api")  # keys sorted: b, w
    assert got[1] == "anything"


def test_leaf_check_policy():
    with pytest.raises(TypeError, match=r"`functx.api`: p\['n'\] must be a floating-point or complex tensor.*int64"):
        flatten_float({"n": torch.ones(2, dtype=torch.int64)}, name="p", api="api")
    with pytest.raises(TypeError, match=r"input x must be .*got a value of type str\. fix it"):
        check_float_leaves(["s"], lambda: ["x"], api="api", what="input ", hint="fix it")
    with pytest.raises(ValueError, match="`p` must contain at least one tensor"):
        flatten_float({}, name="p", api="api", nonempty=True)
    leaves, _ = flatten_float({"z": torch.ones(2, dtype=torch.complex128)}, name="p", api="api")
    assert leaves[0].dtype == torch.complex128


# -- ravel_pytree ------------------------------------------------------------------------


def test_ravel_roundtrip_mixed_dtypes():
    tree = {"a": torch.ones(2, 2), "b": torch.arange(3, dtype=D)}
    flat, unravel = functx.ravel_pytree(tree)
    assert flat.dtype == D and flat.shape == (7,)
    assert_tree_allclose(unravel(flat), tree)


def test_unravel_wrong_length_names_expected_length():
    _, unravel = functx.ravel_pytree({"a": torch.ones(2, 2)})
    with pytest.raises(ValueError, match=r"`functx.ravel_pytree`: `unravel` takes a 1-D tensor of length 4.*\(5,\)"):
        unravel(torch.ones(5))
    with pytest.raises(ValueError, match="length 4"):
        unravel(torch.ones(2, 2))
    with pytest.raises(TypeError, match="takes a 1-D tensor, got a value of type list"):
        unravel([1.0] * 4)


def test_unravel_of_empty_tree_refuses_nonempty_vectors():
    flat, unravel = functx.ravel_pytree({})
    assert flat.shape == (0,)
    assert unravel(flat) == {}
    with pytest.raises(ValueError, match="length 0"):
        unravel(torch.ones(5))


def test_ravel_non_tensor_leaf_is_type_error():
    with pytest.raises(
        TypeError, match=r"`functx.ravel_pytree`: tree\['lr'\] must be a tensor, got a value of type float"
    ):
        functx.ravel_pytree({"w": torch.ones(2), "lr": 0.1})


def test_ravel_composes_with_grad():
    tree = _tree()
    flat, unravel = functx.ravel_pytree(tree)
    g = functx.grad(lambda v: functx.tree_norm(unravel(v)) ** 2)(flat)
    torch.testing.assert_close(g, 2 * flat)


# -- tree algebra ------------------------------------------------------------------------


def test_tree_algebra_against_leafwise_reference():
    x, y = _tree(), _other()
    (xw, xb), (yw, yb) = (x["w"], x["b"][0]), (y["w"], y["b"][0])
    torch.testing.assert_close(functx.tree_vdot(x, y), (xw * yw).sum() + (xb * yb).sum())
    torch.testing.assert_close(functx.tree_norm(x), torch.cat([xw.reshape(-1), xb]).norm())
    assert_tree_allclose(functx.tree_add(x, y), {"w": xw + yw, "b": (xb + yb, None)})
    assert_tree_allclose(functx.tree_sub(x, y), {"w": xw - yw, "b": (xb - yb, None)})
    assert_tree_allclose(functx.tree_scale(3.0, x), {"w": 3 * xw, "b": (3 * xb, None)})
    assert_tree_allclose(functx.tree_axpy(-2.0, x, y), {"w": yw - 2 * xw, "b": (yb - 2 * xb, None)})
    zeros = functx.tree_zeros_like(x)
    assert_tree_allclose(zeros, {"w": torch.zeros_like(xw), "b": (torch.zeros_like(xb), None)})


def test_tree_vdot_conjugates_first_argument_and_norm_is_real():
    g = torch.Generator().manual_seed(2)
    x = [torch.randn(3, dtype=torch.complex128, generator=g)]
    y = [torch.randn(3, dtype=torch.complex128, generator=g)]
    torch.testing.assert_close(functx.tree_vdot(x, y), (x[0].conj() * y[0]).sum())
    n = functx.tree_norm(x)
    assert n.dtype == D
    torch.testing.assert_close(n, (x[0].abs() ** 2).sum().sqrt())


def test_tree_algebra_empty_trees():
    assert functx.tree_vdot({}, {}).item() == 0.0
    assert functx.tree_norm(()).item() == 0.0
    assert functx.tree_add({}, {}) == {}


@pytest.mark.parametrize("api", ["tree_vdot", "tree_add", "tree_sub"])
def test_tree_binary_ops_check_the_second_tree(api):
    x = _tree()
    with pytest.raises(ValueError, match=rf"`functx.{api}`: `y` must have the same tree structure as `x`"):
        getattr(functx, api)(x, {"w": x["w"]})
    with pytest.raises(TypeError, match=rf"`functx.{api}`: y\['w'\] has dtype torch.float32"):
        getattr(functx, api)(x, {**x, "w": x["w"].float()})


def test_tree_ops_refuse_bad_leaves_and_scalars():
    with pytest.raises(TypeError, match=r"`functx.tree_norm`: x\[0\] must be a floating-point"):
        functx.tree_norm([torch.ones(2, dtype=torch.int64)])
    with pytest.raises(TypeError, match=r"`functx.tree_scale`: `alpha` must be a number or a tensor"):
        functx.tree_scale("2", [torch.ones(2)])
    with pytest.raises(TypeError, match=r"`functx.tree_zeros_like`: x\['a'\] must be a tensor"):
        functx.tree_zeros_like({"a": 1.0})


def test_tree_algebra_under_vmap_and_grad():
    x = _tree()
    batched = functx.tree_scale(1.0, {"w": torch.randn(4, 2, 3, dtype=D), "b": (torch.randn(4, 3, dtype=D), None)})
    norms = functx.vmap(functx.tree_norm)(batched)
    for i in range(4):
        torch.testing.assert_close(norms[i], functx.tree_norm({"w": batched["w"][i], "b": (batched["b"][0][i], None)}))
    g = functx.grad(lambda t: functx.tree_vdot(t, t))(x)
    assert_tree_allclose(g, functx.tree_scale(2.0, x))
