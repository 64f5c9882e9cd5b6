"""Property tests: random pytree structures and shapes."""

import torch
import torch.autograd.functional as AF
from helpers import assert_tree_allclose, check_grads, tree_leaves, tree_map
from hypothesis import given
from hypothesis import strategies as st

import functx
from functx._tree import tree_flatten, tree_unflatten

D = torch.float64

shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)


def trees(depth: int = 2):
    leaf = shapes.map(lambda s: ("leaf", s))
    if depth == 0:
        return leaf
    sub = trees(depth - 1)
    return st.one_of(
        leaf,
        st.lists(sub, min_size=1, max_size=3).map(lambda xs: ("list", xs)),
        st.dictionaries(st.sampled_from("abcd"), sub, min_size=1, max_size=3).map(lambda d: ("dict", d)),
        st.tuples(sub, st.just(None)).map(lambda t: ("tuple", t)),
    )


def build(spec, gen):
    kind, body = spec
    if kind == "leaf":
        return torch.randn(body, dtype=D, generator=gen)
    if kind == "list":
        return [build(s, gen) for s in body]
    if kind == "dict":
        return {k: build(s, gen) for k, s in body.items()}
    return (build(body[0], gen), None)


def f(tree):
    leaves = tree_leaves(tree)
    s = sum(l.sum() for l in leaves)
    return sum((torch.cos(l) * l).sum() for l in leaves) + torch.sigmoid(s) * s


def g(tree):
    return tree_map(lambda l: torch.sin(l) * f(tree), tree)


@given(trees(), st.integers(0, 2**16))
def test_grad_and_hessian_match_autograd_functional(spec, seed):
    tree = build(spec, torch.Generator().manual_seed(seed))
    leaves, treespec = tree_flatten(tree)
    flat = lambda *ls: f(tree_unflatten(treespec, list(ls)))
    assert_tree_allclose(functx.grad(f)(tree), tree_unflatten(treespec, list(AF.jacobian(flat, tuple(leaves)))))
    H_ref = AF.hessian(flat, tuple(leaves))
    for mode in ("rev-rev", "fwd-rev"):
        H = functx.hessian(f, mode=mode)(tree)
        expected = tree_unflatten(treespec, [tree_unflatten(treespec, list(row)) for row in H_ref])
        assert_tree_allclose(H, expected)


@given(trees(), st.integers(0, 2**16), st.sampled_from([None, 1, 2, 5]))
def test_jacrev_equals_jacfwd_and_check_grads(spec, seed, chunk_size):
    tree = build(spec, torch.Generator().manual_seed(seed))
    assert_tree_allclose(functx.jacrev(g, chunk_size=chunk_size)(tree), functx.jacfwd(g, chunk_size=chunk_size)(tree))
    check_grads(g, (tree,), order=1)


@given(shapes, st.integers(1, 4), st.integers(0, 2**16))
def test_vmap_grad_equals_loop(shape, batch, seed):
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn((batch,) + shape, dtype=D, generator=gen)
    w = torch.randn(shape, dtype=D, generator=gen)
    loss = lambda w, x: (torch.tanh(w * x) ** 2).sum()
    per_sample = functx.vmap(functx.grad(loss), in_dims=(None, 0))(w, xs)
    expected = torch.stack([AF.jacobian(lambda w: loss(w, x), w) for x in xs])
    torch.testing.assert_close(per_sample, expected)
