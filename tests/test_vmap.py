"""functx.vmap: torch.vmap semantics over optree pytrees."""

import collections

import pytest
import torch
from helpers import GlobalPoint, Pair, Params, assert_tree_allclose, tree_map

import functx

D = torch.float64


def loop(f, n, *args):
    """Reference: run f on each sample and stack."""
    outs = [f(*(a(k) for a in args)) for k in range(n)]
    return tree_map(lambda *xs: torch.stack(xs), *outs)


def test_dict_prefix_in_dims_and_broadcast_params():
    p = {"w": torch.randn(5, 3, dtype=D), "b": torch.randn(2, dtype=D)}
    x = torch.randn(3, 5, dtype=D)
    f = lambda p, x: {"y": p["w"] @ x + p["b"].sum(), "n": p["b"] * 2}
    out = functx.vmap(f, in_dims=({"w": 0, "b": None}, 1), out_dims={"y": 0, "n": None})(p, x)
    assert out["n"].shape == (2,)
    torch.testing.assert_close(out["n"], p["b"] * 2)
    ref = loop(lambda w, xk: w @ xk + p["b"].sum(), 5, lambda k: p["w"][k], lambda k: x[:, k])
    torch.testing.assert_close(out["y"], ref)


@pytest.mark.parametrize("kind", ["namedtuple", "ordereddict", "dataclass", "global_class"])
def test_registered_and_builtin_node_types(kind):
    a, b = torch.randn(4, 2, dtype=D), torch.randn(4, 2, dtype=D)
    tree = {
        "namedtuple": Pair(a, b),
        "ordereddict": collections.OrderedDict([("z", a), ("a", b)]),
        "dataclass": Params(w=a, b=b, name="n"),
        "global_class": GlobalPoint(a, b),
    }[kind]
    f = lambda t: tree_map(lambda leaf: torch.sin(leaf).sum(), t)
    out = functx.vmap(f)(tree)
    assert type(out) is type(tree)
    expected = tree_map(lambda leaf: torch.sin(leaf).sum(-1), tree)
    assert_tree_allclose(out, expected)


def test_out_dims_negative_and_nested_prefix():
    x = torch.randn(4, 3, dtype=D)
    f = lambda x: (x * 2, {"a": x.outer(x), "b": x.sum()})
    y, d = functx.vmap(f, out_dims=(1, {"a": -1, "b": 0}))(x)
    torch.testing.assert_close(y, (x * 2).T)
    torch.testing.assert_close(d["a"], torch.einsum("ni,nj->ijn", x, x))
    torch.testing.assert_close(d["b"], x.sum(1))


def test_negative_in_dims_kwargs_unbatched_and_static_outputs():
    x = torch.randn(3, 6, dtype=D)
    scale = torch.tensor([1.0, 2.0, 3.0], dtype=D)
    f = lambda x, *, scale: (x * scale, "static", None)
    out, tag, none = functx.vmap(f, in_dims=-1)(x, scale=scale)
    assert tag == "static" and none is None
    torch.testing.assert_close(out, x.T * scale)


def test_chunk_size_and_randomness():
    x = torch.randn(10, 3, dtype=D)
    f = lambda x: functx.grad(lambda x: (x**3).sum())(x)
    torch.testing.assert_close(functx.vmap(f, chunk_size=3)(x), 3 * x**2)
    noise = functx.vmap(lambda x: x + torch.rand(()), randomness="different")(torch.zeros(64))
    assert noise.unique().numel() == 64
    same = functx.vmap(lambda x: x + torch.rand(()), randomness="same")(torch.zeros(8))
    assert same.unique().numel() == 1
    with pytest.raises(RuntimeError, match="randomness"):  # torch's own error
        functx.vmap(lambda x: x + torch.rand(()))(torch.zeros(3))


def test_none_arguments_and_none_subtrees():
    x = torch.randn(4, 2, dtype=D)
    f = lambda x, opt, tree: x.sum() + (0 if opt is None else 1) + tree["t"].sum()
    out = functx.vmap(f, in_dims=(0, None, {"t": 0, "n": None}))(x, None, {"t": x, "n": None})
    torch.testing.assert_close(out, 2 * x.sum(1))


def test_vmap_composes_with_torch_vmap_and_func_transforms():
    x = torch.randn(2, 3, 4, dtype=D)
    inner = functx.vmap(lambda v: (v**2).sum())
    torch.testing.assert_close(torch.vmap(inner)(x), (x**2).sum(-1))
    g = torch.func.grad(lambda v: functx.vmap(torch.sin)(v).sum())(x[0])
    torch.testing.assert_close(g, torch.cos(x[0]))


# --------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "in_dims, args, exc, fragment",
    [
        (None, (torch.ones(3),), ValueError, "at least one tensor argument must be batched"),
        ((0, 0), (torch.ones(3), torch.ones(4)), ValueError, "inconsistent batch sizes"),
        ((0,), (torch.ones(3), torch.ones(3)), ValueError, "has 1 entries"),
        (0, ("text",), TypeError, "give it `None`"),
        (2, (torch.ones(3, 2),), ValueError, "no dimension 2"),
        (0, (torch.tensor(1.0),), ValueError, "no dimension 0"),
        ({"a": 0}, ({"a": torch.ones(2)},), TypeError, "in_dims"),
        (({"b": 0},), ({"a": torch.ones(2)},), ValueError, "tree prefix"),
        ((0.5,), (torch.ones(2),), TypeError, "ints or None"),
    ],
)
def test_vmap_errors(in_dims, args, exc, fragment):
    with pytest.raises(exc, match=fragment) as info:
        functx.vmap(lambda *a: a[0], in_dims=in_dims)(*args)
    assert "functx.vmap" in str(info.value)


def test_vmap_option_errors():
    with pytest.raises(TypeError, match="callable"):
        functx.vmap(3)
    with pytest.raises(ValueError, match="randomness"):
        functx.vmap(torch.sin, randomness="maybe")
    with pytest.raises(ValueError, match="chunk_size"):
        functx.vmap(torch.sin, chunk_size=0)
    with pytest.raises(ValueError, match="tree prefix"):
        functx.vmap(lambda x: (x, x), out_dims=(0, 0, 0))(torch.ones(2))
