"""functx.autograd_functional against torch.autograd.functional itself: values, nesting,
flags, strict errors, exception types and messages, no_grad, create_graph derivatives
(gradcheck / gradgradcheck), routing and fallback."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import warnings

import pytest
import torch
import torch.autograd.functional as TAF
from torch.autograd import gradcheck, gradgradcheck

import functx.autograd_functional as AF
from functx._autograd_functional._spec import SPECS

# --------------------------------------------------------------------------------------
# Helpers


def assert_same(new, old, *, create_graph=False, rtol=1e-5, atol=1e-6):
    """Same nesting (Tensor vs tuple), shapes, dtypes, values; a ``grad_fn`` wherever the
    original has one, and none where the original's result is detached. (Blocks the
    original returns as constants, e.g. the Jacobian of a linear function, may keep a
    graph with create_graph=True: the documentation allows both.)"""
    if isinstance(old, torch.Tensor):
        assert isinstance(new, torch.Tensor), f"expected a Tensor, got {type(new)}"
        assert new.shape == old.shape and new.dtype == old.dtype, (new.shape, old.shape, new.dtype, old.dtype)
        torch.testing.assert_close(new.detach(), old.detach(), rtol=rtol, atol=atol)
        if old.grad_fn is not None:
            assert new.grad_fn is not None, "result detached where the original's is not"
        if not create_graph:
            assert new.grad_fn is None, "result not detached"
        return
    assert type(new) is type(old) and len(new) == len(old), (type(new), type(old))
    for a, b in zip(new, old):
        assert_same(a, b, create_graph=create_graph, rtol=rtol, atol=atol)


def outcome(fn):
    """``("ok", result)`` or ``("error", type, message)``."""
    try:
        return ("ok", fn())
    except Exception as err:
        return ("error", type(err), str(err))


def assert_same_outcome(new_fn, old_fn, **kw):
    new, old = outcome(new_fn), outcome(old_fn)
    assert new[0] == old[0], f"new: {new[:3]}\nold: {old[:3]}"
    if new[0] == "error":
        assert new[1:] == old[1:]
    else:
        assert_same(new[1], old[1], **kw)


@pytest.fixture
def forward_mode_jvp(monkeypatch):
    """Route every non-strict jvp to functx's forward mode, whatever the size."""
    monkeypatch.setitem(SPECS, "jvp", dataclasses.replace(SPECS["jvp"], min_numel=0))


@pytest.fixture
def original_calls(monkeypatch):
    """Count the calls of each original function made through functx."""
    calls = {}
    for name in ("vjp", "jvp", "jacobian", "hessian", "vhp", "hvp"):
        real = getattr(TAF, name)

        def spy(*args, _name=name, _real=real, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(TAF, name, spy)
        monkeypatch.setitem(SPECS, name, dataclasses.replace(SPECS[name], original=spy))
    return calls


def tuples(result):
    """Lists (the original's forward-mode results) as tuples."""
    return tuple(tuples(r) for r in result) if isinstance(result, (list, tuple)) else result


def lists_like(values, nesting):
    """``values`` with the list/tuple containers of ``nesting``."""
    if isinstance(nesting, torch.Tensor):
        return values
    return type(nesting)(lists_like(v, n) for v, n in zip(values, nesting))


@contextlib.contextmanager
def fast_path(calls, allowed=()):
    """Assert that the block calls no original function (but ``allowed`` ones)."""
    before = dict(calls)
    yield
    extra = {k: n - before.get(k, 0) for k, n in calls.items() if n != before.get(k, 0) and k not in allowed}
    assert not extra, f"ran the original: {extra}"


def rand(*shape, dtype=torch.float64, gen=None):
    return torch.rand(shape, dtype=dtype, generator=gen) + 0.5


# --------------------------------------------------------------------------------------
# A catalogue of functions: Tensor / tuple inputs and outputs, unrelated outputs, scalars.
# Each entry: (func, input shapes); inputs are a Tensor when there is one shape.

VECTOR_FUNCS = {
    "t->t": (lambda x: x.exp().sum(dim=1), [(3, 2)]),
    "t->tuple": (lambda x: (x**2, x.sum()), [(3,)]),
    "tuple->t": (lambda x, y: (x.cos() * x) @ y.sin(), [(2, 3), (3, 2)]),
    "tuple->tuple": (lambda x, y: ((x * x) @ y, x @ (x.sum(1) * y), y.sum()), [(2, 3), (3, 2)]),
    "unrelated": (lambda x, y: (x, y, x, y), [(2,), (3,)]),
    "zero-dim": (lambda x, y: (y.sum(), x * y), [(), (1,)]),
    "scalar-in": (lambda x: torch.stack([x, x**2, x.sin()]), [()]),
    "partial": (lambda x, y: x.exp() * 2, [(2,), (3,)]),
}

SCALAR_FUNCS = {
    "t": (lambda x: (x**3).sum(), [(2, 2)]),
    "tuple": (lambda x, y, z: ((x.relu() * x) @ y.sin() @ z).sum(), [(2, 3), (3, 2), (2, 2)]),
    "unrelated": (lambda x, y: (x**2).sum(), [(2,), (3,)]),
    "view111": (lambda x: x.exp().sum().view(1, 1, 1), [(3,)]),
    "scalar-in": (lambda x: x.exp() * x, [()]),
    "linear": (lambda x, y: (3 * x).sum() + (x * y).sum(), [(2,), (2,)]),
    "constant": (lambda x, y: torch.ones([], dtype=x.dtype), [(2,), (3,)]),
}


def make_inputs(shapes, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xs = tuple(rand(*s, dtype=dtype, gen=gen) for s in shapes)
    return xs[0] if len(xs) == 1 else xs


def like(inputs, seed=1):
    gen = torch.Generator().manual_seed(seed)
    if isinstance(inputs, torch.Tensor):
        return torch.randn(inputs.shape, dtype=inputs.dtype, generator=gen)
    return tuple(torch.randn(t.shape, dtype=t.dtype, generator=gen) for t in inputs)


# --------------------------------------------------------------------------------------
# Values and nesting, across flags


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(VECTOR_FUNCS))
def test_jacobian_parity(name, dtype, create_graph, original_calls):
    func, shapes = VECTOR_FUNCS[name]
    inputs = make_inputs(shapes, dtype)
    expected = TAF.jacobian(func, inputs, create_graph=create_graph)
    # the original's forward mode needs vectorize=True and create_graph=False; it returns lists
    forward = TAF.jacobian(func, inputs, strategy="forward-mode", vectorize=True)
    if not create_graph:
        assert_same(tuples(forward), expected)
    for vectorize, strategy in itertools.product([False, True], ["reverse-mode", "forward-mode"]):
        with fast_path(original_calls):
            result = AF.jacobian(func, inputs, create_graph=create_graph, vectorize=vectorize, strategy=strategy)
        assert_same(
            result, expected if strategy == "reverse-mode" else lists_like(expected, forward), create_graph=create_graph
        )
    assert_same_outcome(
        lambda: AF.jacobian(func, inputs, create_graph, strict=True),
        lambda: TAF.jacobian(func, inputs, create_graph, strict=True),
        create_graph=create_graph,
    )


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(SCALAR_FUNCS))
def test_hessian_parity(name, dtype, create_graph, original_calls):
    func, shapes = SCALAR_FUNCS[name]
    inputs = make_inputs(shapes, dtype)
    expected = TAF.hessian(func, inputs, create_graph=create_graph)
    forward = TAF.hessian(func, inputs, vectorize=True, outer_jacobian_strategy="forward-mode")
    for vectorize, strategy in itertools.product([False, True], ["reverse-mode", "forward-mode"]):
        with fast_path(original_calls):
            result = AF.hessian(
                func, inputs, create_graph=create_graph, vectorize=vectorize, outer_jacobian_strategy=strategy
            )
        assert_same(
            result, expected if strategy == "reverse-mode" else lists_like(expected, forward), create_graph=create_graph
        )


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(VECTOR_FUNCS))
def test_jvp_vjp_parity(name, dtype, create_graph, forward_mode_jvp, original_calls):
    func, shapes = VECTOR_FUNCS[name]
    inputs = make_inputs(shapes, dtype)
    v_in = like(inputs)
    with fast_path(original_calls):
        new = AF.jvp(func, inputs, v_in, create_graph)
    assert_same(new, TAF.jvp(func, inputs, v_in, create_graph), create_graph=create_graph)
    v_out = like(func(*(inputs if isinstance(inputs, tuple) else (inputs,))))
    assert_same(
        AF.vjp(func, inputs, v_out, create_graph), TAF.vjp(func, inputs, v_out, create_graph), create_graph=create_graph
    )


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(SCALAR_FUNCS))
def test_hvp_vhp_parity(name, dtype, create_graph, original_calls):
    func, shapes = SCALAR_FUNCS[name]
    inputs = make_inputs(shapes, dtype)
    v = like(inputs)
    for api in ("hvp", "vhp"):
        expected = getattr(TAF, api)(func, inputs, v, create_graph)
        with fast_path(original_calls, allowed=("vhp",)):  # hvp runs vhp's algorithm
            new = getattr(AF, api)(func, inputs, v, create_graph)
        assert_same(new, expected, create_graph=create_graph)
        assert_same_outcome(
            lambda: getattr(AF, api)(func, inputs, v, create_graph, strict=True),
            lambda: getattr(TAF, api)(func, inputs, v, create_graph, strict=True),
            create_graph=create_graph,
        )


def test_v_none_for_single_element(forward_mode_jvp):
    x = torch.tensor(0.7, dtype=torch.float64)
    f = lambda t: torch.stack([t.sin(), t.exp()])
    g = lambda t: t.exp() * t
    assert_same(AF.jvp(f, x), TAF.jvp(f, x))
    assert_same(AF.vjp(g, x), TAF.vjp(g, x))
    for api in ("hvp", "vhp"):
        assert_same(getattr(AF, api)(g, x), getattr(TAF, api)(g, x))


def test_mixed_dtypes_reverse_follows_inputs_forward_follows_outputs():
    f = lambda x, y: ((x * y).float(), (x * y).double())
    inputs = (torch.randn(3), torch.randn(3))
    expected = TAF.jacobian(f, inputs)
    assert_same(AF.jacobian(f, inputs), expected)
    forward = AF.jacobian(f, inputs, strategy="forward-mode")
    assert [b.dtype for row in forward for b in row] == [torch.float32] * 2 + [torch.float64] * 2
    assert isinstance(forward, list) and isinstance(forward[0], list)  # as the original's
    assert_same(forward, TAF.jacobian(f, inputs, strategy="forward-mode", vectorize=True))


def test_jvp_v_dtype_is_cast_like_the_original(forward_mode_jvp):
    x = torch.randn(3, dtype=torch.float64)
    v = torch.ones(3, dtype=torch.float32)
    assert_same(AF.jvp(torch.sin, x, v), TAF.jvp(torch.sin, x, v))


def test_closures_over_inputs_are_constants():
    # pytorch issue 32576: the original differentiates fresh tensors, not captured ones
    x = torch.randn(3, dtype=torch.float64)
    f = lambda t: t * x
    assert_same(AF.jacobian(f, x), TAF.jacobian(f, x))
    torch.testing.assert_close(AF.jacobian(f, x), torch.diag(x))


def test_closures_over_parameters_with_create_graph():
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, dtype=torch.float64)
    f = lambda t: (w * t).sin()
    new, old = AF.jacobian(f, x, create_graph=True), TAF.jacobian(f, x, create_graph=True)
    assert_same(new, old, create_graph=True)
    (g_new,), (g_old,) = torch.autograd.grad(new.sum(), w), torch.autograd.grad(old.sum(), w)
    torch.testing.assert_close(g_new, g_old)
    assert AF.jacobian(f, x).grad_fn is None


# --------------------------------------------------------------------------------------
# create_graph: results differentiable w.r.t. inputs and v (gradcheck / gradgradcheck)


def _flatten(res):
    return tuple(t for row in res for t in (row if isinstance(row, (tuple, list)) else (row,)))


def test_jacobian_create_graph_gradcheck():
    f = lambda x, y: ((x + y).exp().sum(dim=1), x * y.sin())
    inputs = (rand(2, 2).requires_grad_(), rand(2, 2).requires_grad_())
    for strategy in ("reverse-mode", "forward-mode"):
        fn = lambda *xs: _flatten(AF.jacobian(f, xs, create_graph=True, strategy=strategy))
        assert gradcheck(fn, inputs)
    fn = lambda *xs: _flatten(AF.jacobian(f, xs, create_graph=True))
    assert gradgradcheck(fn, inputs)


def test_hessian_create_graph_gradcheck():
    f = lambda x, y: (x + y).pow(3).sum() + (x * y).sin().sum()
    inputs = (rand(2).requires_grad_(), rand(2).requires_grad_())
    fn = lambda *xs: _flatten(AF.hessian(f, xs, create_graph=True))
    assert gradcheck(fn, inputs) and gradgradcheck(fn, inputs)

    def nested(x, y):  # the result used inside a larger differentiable computation
        x = x.cos()
        hess = AF.hessian(f, (x, y), create_graph=True)
        return sum(h.cos().sum() for h in _flatten(hess)) + x.cos().sum()

    assert gradcheck(nested, inputs)


@pytest.mark.parametrize("api", ["jvp", "hvp"])
def test_products_create_graph_gradcheck(api, forward_mode_jvp):
    f = {"jvp": lambda x, y: (2 * x + 3 * y, x * y.exp()), "hvp": lambda x, y: (x.exp() * y.sin()).sum()}[api]
    args = (rand(2).requires_grad_(), rand(2).requires_grad_(), rand(2).requires_grad_(), rand(2).requires_grad_())
    fn = lambda *a: getattr(AF, api)(f, a[:2], a[2:], create_graph=True)[1]
    assert gradcheck(fn, args) and gradgradcheck(fn, args)


# --------------------------------------------------------------------------------------
# no_grad, detached results, inputs untouched


@pytest.mark.parametrize("api", ["jvp", "vjp", "hvp", "vhp", "jacobian", "hessian"])
def test_no_grad(api, forward_mode_jvp):
    f = (lambda x: x.exp().sum()) if api in ("hvp", "vhp", "hessian") else (lambda x: x.exp().sum(dim=1))
    x = torch.rand(3, 3)
    v = {"jvp": x, "vjp": torch.ones(3), "hvp": x, "vhp": x}.get(api)
    args = (x,) if v is None else (x, v)
    for create_graph in (False, True):
        with torch.no_grad():
            new = getattr(AF, api)(f, *args, create_graph=create_graph)
            old = getattr(TAF, api)(f, *args, create_graph=create_graph)
        assert_same(new, old, create_graph=create_graph)
        assert all((t.grad_fn is not None) == create_graph for t in _flatten(new if isinstance(new, tuple) else (new,)))


@pytest.mark.parametrize("create_graph", [False, True])
def test_inputs_never_mutated(create_graph, forward_mode_jvp):
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, dtype=torch.float64)
    before = (x.detach().clone(), y.clone())
    f = lambda a, b: (a * b).sin().sum()
    for api in ("jacobian", "hessian"):
        getattr(AF, api)(f, (x, y), create_graph=create_graph)
    for api in ("jvp", "hvp"):
        getattr(AF, api)(f, (x, y), (y, y), create_graph=create_graph)
    assert x.requires_grad and not y.requires_grad and x.grad is None and x.is_leaf
    assert torch.equal(x.detach(), before[0]) and torch.equal(y, before[1])


# --------------------------------------------------------------------------------------
# Errors: the same type and the same message as the original


def _foo(a):
    return 3 * a.narrow(0, 0, 3)


def _scalar(a):
    return 3 * a.narrow(0, 0, 3).exp().sum()


ALL = ("vjp", "jvp", "vhp", "hvp", "jacobian", "hessian")
WITH_V, SCALAR, MATRIX = ("vjp", "jvp", "vhp", "hvp"), ("vhp", "hvp", "hessian"), ("jacobian", "hessian")
_pair = (lambda a, b: a.sum() * b.sum(), (torch.rand(3), torch.rand(3)))

# name: (the APIs it applies to, the call with M = the module under test)
ERROR_CASES = {
    "inputs not tensors": (ALL, lambda M, api: _call(M, api, _foo, (torch.rand(4), 2))),
    "list inputs": (ALL, lambda M, api: _call(M, api, _foo, [torch.rand(4)])),
    "non-tensor output": (ALL, lambda M, api: _call(M, api, lambda a: (3 * a, "bar"), torch.rand(4))),
    "list output": (ALL, lambda M, api: _call(M, api, lambda a: [3 * a], torch.rand(4))),
    "integer inputs": (ALL, lambda M, api: _call(M, api, lambda a: a * 2, torch.arange(3))),
    "func raises": (ALL, lambda M, api: _call(M, api, lambda a: a @ torch.ones(5), torch.rand(4))),
    "v None, many elements": (WITH_V, lambda M, api: _call(M, api, _foo, torch.rand(4), v=None)),
    "v too many": (WITH_V, lambda M, api: _call(M, api, _foo, torch.rand(4), v=(torch.rand(4), torch.rand(4)))),
    "v wrong size": (WITH_V, lambda M, api: _call(M, api, _foo, torch.rand(4), v=torch.rand(2))),
    "v tuple wrong length": (WITH_V, lambda M, api: _call(M, api, *_pair, v=(torch.rand(3),))),
    "v entry wrong size": (WITH_V, lambda M, api: _call(M, api, *_pair, v=(torch.rand(3), torch.rand(2)))),
    "v not tensor": (WITH_V, lambda M, api: _call(M, api, _scalar, torch.rand(4), v=(torch.rand(4), 2))),
    "tuple output": (SCALAR, lambda M, api: _call(M, api, lambda a: (a.sum(), a.sum()), torch.rand(4))),
    "non-scalar output": (SCALAR, lambda M, api: _call(M, api, _foo, torch.rand(4))),
    "bad strategy": (MATRIX, lambda M, api: _call(M, api, _scalar, torch.rand(4), strategy="sideways")),
    "strict and vectorize": (MATRIX, lambda M, api: _call(M, api, _scalar, torch.rand(4), strict=True, vectorize=True)),
    "strict and forward-mode": (
        MATRIX,
        lambda M, api: _call(M, api, _scalar, torch.rand(4), strict=True, strategy="forward-mode"),
    ),
    "strict, forward-mode, create_graph": (
        MATRIX,
        lambda M, api: _call(M, api, _scalar, torch.rand(4), strict=True, strategy="forward-mode", create_graph=True),
    ),
}


def _call(M, api, func, inputs, v="default", strict=False, vectorize=False, strategy=None, create_graph=False):
    if api in MATRIX:
        kw = {"strict": strict, "vectorize": vectorize, "create_graph": create_graph}
        if strategy is not None:
            kw["strategy" if api == "jacobian" else "outer_jacobian_strategy"] = strategy
        return getattr(M, api)(func, inputs, **kw)
    if v == "default":
        v = torch.rand(4) if api != "vjp" else torch.rand(3)
    return getattr(M, api)(func, inputs, v, strict=strict)


@pytest.mark.parametrize("case,api", [(case, api) for case, (apis, _) in ERROR_CASES.items() for api in apis])
def test_errors_match_the_original(case, api, forward_mode_jvp):
    run = ERROR_CASES[case][1]
    new, old = outcome(lambda: run(AF, api)), outcome(lambda: run(TAF, api))
    assert old[0] == "error", old
    assert new[0] == "error" and new[1:] == old[1:], f"\nnew: {new[1:]}\nold: {old[1:]}"


# --------------------------------------------------------------------------------------
# strict=True: the same errors (plain-autograd probe) or the same results


def _detached(a):
    return a.detach()


def _disconnected(a):
    return a.long().float().requires_grad_().clone()  # requires grad, not connected to a


STRICT_VECTOR = {
    "detached": _detached,
    "disconnected": _disconnected,
    "linear": lambda a: a.clone(),
    "second output detached": lambda a: (a**2, a.detach()),
    "quadratic": lambda a: a**2,
}
STRICT_TUPLE = {
    "separable": lambda a, b: (a**2, b**3),
    "one input unused": lambda a, b: (a**2).sum(),
    "coupled": lambda a, b: a * b,
}
STRICT_SCALAR = {
    "detached": lambda a: a.detach().sum(),
    "disconnected": lambda a: _disconnected(a).sum(),
    "linear": lambda a: (3 * a).sum(),
    "cubic": lambda a: (a**3).sum(),
    "quadratic": lambda a: (a**2).sum(),
}
STRICT_SCALAR_TUPLE = {
    "separable": lambda a, b: (a**3).sum() + (b**3).sum(),
    "coupled": lambda a, b: (a**2 * b**2).sum(),
    "one input unused": lambda a, b: (a**3).sum(),
}


def _strict_cases(vector):
    one, two = (STRICT_VECTOR, STRICT_TUPLE) if vector else (STRICT_SCALAR, STRICT_SCALAR_TUPLE)
    return [(n, f, 1) for n, f in one.items()] + [(n, f, 2) for n, f in two.items()]


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("name,func,nin", _strict_cases(vector=True), ids=lambda p: p if isinstance(p, str) else "")
def test_strict_vector_apis(name, func, nin, create_graph, forward_mode_jvp):
    x = torch.rand(4, dtype=torch.float64, requires_grad=create_graph)
    inputs = x if nin == 1 else (x, torch.rand(4, dtype=torch.float64))
    assert_same_outcome(
        lambda: AF.jacobian(func, inputs, create_graph, True),
        lambda: TAF.jacobian(func, inputs, create_graph, True),
        create_graph=create_graph,
    )
    v_in = like(inputs)
    assert_same_outcome(
        lambda: AF.jvp(func, inputs, v_in, create_graph, True),
        lambda: TAF.jvp(func, inputs, v_in, create_graph, True),
        create_graph=create_graph,
    )
    out = func(*(inputs if nin == 2 else (inputs,)))
    v_out = like(out)
    assert_same_outcome(
        lambda: AF.vjp(func, inputs, v_out, create_graph, True),
        lambda: TAF.vjp(func, inputs, v_out, create_graph, True),
        create_graph=create_graph,
    )


@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("name,func,nin", _strict_cases(vector=False), ids=lambda p: p if isinstance(p, str) else "")
def test_strict_scalar_apis(name, func, nin, create_graph):
    x = torch.rand(4, dtype=torch.float64, requires_grad=create_graph)
    inputs = x if nin == 1 else (x, torch.rand(4, dtype=torch.float64))
    assert_same_outcome(
        lambda: AF.hessian(func, inputs, create_graph, True),
        lambda: TAF.hessian(func, inputs, create_graph, True),
        create_graph=create_graph,
    )
    v = like(inputs)
    for api in ("hvp", "vhp"):
        assert_same_outcome(
            lambda: getattr(AF, api)(func, inputs, v, create_graph, True),
            lambda: getattr(TAF, api)(func, inputs, v, create_graph, True),
            create_graph=create_graph,
        )


def test_strict_probe_is_cheap(original_calls):
    # strict jacobian/hessian check connectivity with plain autograd, then run the fast path
    f = lambda a: (a**3).sum()
    x = torch.rand(16, dtype=torch.float64)
    new = AF.hessian(f, x, strict=True), AF.jacobian(torch.sin, x, strict=True)
    assert original_calls == {}
    assert_same(new, (TAF.hessian(f, x, strict=True), TAF.jacobian(torch.sin, x, strict=True)))


# --------------------------------------------------------------------------------------
# Routing: the fast path by default; the original where torch.func cannot run func


def test_routes(original_calls):
    x = torch.rand(8, dtype=torch.float64)
    big = torch.rand(SPECS["jvp"].min_numel)
    f, g = (lambda a: a.sin() * a), (lambda a: (a.sin() * a).sum())
    AF.jacobian(f, x, vectorize=False)
    AF.hessian(g, x)
    AF.jvp(f, big, big)
    AF.hvp(g, x, x)
    assert original_calls == {"vhp": 1}  # hvp = reverse over reverse through vhp's algorithm
    AF.jvp(f, x, x)
    AF.vjp(f, x, x)
    AF.vhp(g, x, x)
    AF.hvp(g, x, x, strict=True)
    assert original_calls == {"vhp": 2, "jvp": 1, "vjp": 1, "hvp": 1}


class LegacySquare(torch.autograd.Function):
    """Old-style Function (no setup_context): torch.func cannot transform it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**2

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class ItemInBackward(torch.autograd.Function):
    """New-style Function whose backward calls ``.item()``: it cannot run under vmap."""

    @staticmethod
    def forward(x):
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad * 2 * (1.0 + 0.0 * grad.sum().item())


FALLBACKS = {
    "legacy autograd.Function": lambda a: LegacySquare.apply(a).sin(),
    ".item() in a backward under vmap": lambda a: ItemInBackward.apply(a).sin(),
    "integer output": lambda a: (a * 3, (a > 0.5).long()),
}


@pytest.mark.parametrize("name", list(FALLBACKS))
def test_fallback_to_the_original(name, original_calls, forward_mode_jvp):
    func = FALLBACKS[name]
    x = torch.rand(3, dtype=torch.float64)
    AF.jacobian(func, x)
    assert original_calls == {"jacobian": 1}  # torch.func failed: the original ran
    for strategy in ("reverse-mode", "forward-mode"):
        assert_same_outcome(
            lambda: AF.jacobian(func, x, strategy=strategy, vectorize=True),
            lambda: TAF.jacobian(func, x, strategy=strategy, vectorize=True),
        )
    v = like(x)
    if name != "integer output":
        assert_same_outcome(lambda: AF.jvp(func, x, v), lambda: TAF.jvp(func, x, v))
        scalar = lambda a: func(a).sum()
        assert_same_outcome(lambda: AF.hessian(scalar, x), lambda: TAF.hessian(scalar, x))


def test_no_warnings():
    x = torch.randn(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        AF.jacobian(lambda a: a**2, x, vectorize=True)
        AF.hessian(lambda a: (a**2).sum(), x, vectorize=True)
    assert not caught, [str(w.message) for w in caught]


# --------------------------------------------------------------------------------------
# What the original refuses and functx does (documented): forward mode without
# vectorize=True, and with create_graph=True


def test_forward_mode_without_vectorize_and_with_create_graph():
    f = lambda x: x.exp() * x.sum()
    x = rand(3)
    with pytest.raises(NotImplementedError, match="only implemented for `vectorize=True`"):
        TAF.jacobian(f, x, strategy="forward-mode")
    expected = TAF.jacobian(f, x)
    assert_same(AF.jacobian(f, x, strategy="forward-mode"), expected)
    xr = x.clone().requires_grad_()
    fn = lambda t: AF.jacobian(f, t, create_graph=True, strategy="forward-mode")
    assert gradcheck(fn, (xr,))
    g = lambda t: (t.exp() * t).sum()
    assert_same(AF.hessian(g, x, outer_jacobian_strategy="forward-mode"), TAF.hessian(g, x))


# --------------------------------------------------------------------------------------
# Composition: results used inside other differentiable code, and a per-sample loop


def test_jacobian_inside_hessian_parity():
    def f(x):
        J = AF.jacobian(lambda t: t.sin() * t.sum(), x, create_graph=True)
        return (J**2).sum()

    def f_old(x):
        J = TAF.jacobian(lambda t: t.sin() * t.sum(), x, create_graph=True)
        return (J**2).sum()

    x = rand(3)
    assert_same(AF.hessian(f, x), TAF.hessian(f_old, x))


def test_matches_independent_closed_forms():
    # f(x) = sum(x^3) / 3 + x0 * x1: gradient x^2 + (x1, x0, 0), Hessian diag(2x) + swap
    x = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    f = lambda t: (t**3).sum() / 3 + t[0] * t[1]
    H = torch.diag(2 * x)
    H[0, 1] = H[1, 0] = 1.0
    torch.testing.assert_close(AF.hessian(f, x), H)
    v = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(AF.hvp(f, x, v)[1], H @ v)
    J = AF.jacobian(lambda t: t**2, x)
    torch.testing.assert_close(J, torch.diag(2 * x))


def test_vmap_over_the_drop_in():
    # per-sample Hessians and Jacobians: vmap composes with the fast path (the original's
    # requires_grad_() cannot run under vmap), checked against a loop over the original
    g = lambda x: (x**3).sum() + x[0] * x[1] * x[2].sin()
    xs = torch.randn(5, 3, dtype=torch.float64)
    H = torch.vmap(lambda x: AF.hessian(g, x))(xs)
    torch.testing.assert_close(H, torch.stack([TAF.hessian(g, x) for x in xs]))
    J = torch.vmap(lambda x: AF.jacobian(torch.sin, x))(xs)
    torch.testing.assert_close(J, torch.stack([torch.diag(x.cos()) for x in xs]))
