"""functx.autograd_functional against torch.autograd.functional on its sharp edges:
complex inputs/outputs (raise exactly where the original raises, agree where it returns)
and functions that write their inputs in place (the original's error in every mode and
size; the caller's tensors never written)."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re

import pytest
import torch
import torch.autograd.functional as TAF
from test_autograd_functional import assert_same_outcome, outcome

import functx._autograd_functional as room
import functx.autograd_functional as AF
from functx._autograd_functional._spec import SPECS

D, C = torch.float64, torch.complex128

# --------------------------------------------------------------------------------------
# Complex numbers: a grid of (real/complex input) x (real/complex output) x API x flags.

POINTS = {"real": torch.tensor([0.5, -1.5, 2.0], dtype=D), "complex": torch.tensor([1 + 2j, 3 - 1j, -0.5j], dtype=C)}
MAPS = {  # output kind -> an elementwise map accepting real and complex inputs
    "real": lambda x: (x * x.conj()).real if x.is_complex() else x * x,
    "complex": lambda x: x * x * 1j,
}
FLAGS = {
    "jacobian": [{}, {"vectorize": True}, {"vectorize": True, "strategy": "forward-mode"}, {"create_graph": True}],
    "hessian": [
        {},
        {"vectorize": True},
        {"vectorize": True, "outer_jacobian_strategy": "forward-mode"},
        {"create_graph": True},
    ],
    "jvp": [{}, {"create_graph": True}],
    "vjp": [{}, {"create_graph": True}],
    "hvp": [{}, {"create_graph": True}],
    "vhp": [{}, {"create_graph": True}],
}
SCALAR = {"hessian", "hvp", "vhp"}
GRID = [
    (api, x_kind, out_kind, flags)
    for api, flag_sets in FLAGS.items()
    for x_kind in POINTS
    for out_kind in MAPS
    for flags in flag_sets
]


def call(module, api, x_kind, out_kind, flags):
    x = POINTS[x_kind].clone()
    g = MAPS[out_kind]
    f = (lambda t: g(t).sum()) if api in SCALAR else g
    if api in ("jacobian", "hessian"):
        return lambda: getattr(module, api)(f, x, **flags)
    v = torch.ones_like(g(x)) if api == "vjp" else torch.ones_like(x)
    return lambda: getattr(module, api)(f, x, v, **flags)


@pytest.fixture(params=["default routing", "forward-mode jvp at every size"])
def jvp_routing(request, monkeypatch):
    if request.param != "default routing":
        monkeypatch.setitem(SPECS, "jvp", dataclasses.replace(SPECS["jvp"], min_numel=0))


@pytest.mark.parametrize("api, x_kind, out_kind, flags", GRID, ids=lambda p: str(p))
def test_complex_grid_matches_the_original(api, x_kind, out_kind, flags, jvp_routing):
    old = call(TAF, api, x_kind, out_kind, flags)
    if flags.get("outer_jacobian_strategy") == "forward-mode":
        old = detached(old)  # the original's forward-over-reverse Hessian keeps a graph even without create_graph
    assert_same_outcome(call(AF, api, x_kind, out_kind, flags), old, create_graph=flags.get("create_graph", False))


def detached(fn):
    def run():
        result = fn()
        return [detached(lambda r=r: r)() for r in result] if isinstance(result, list) else result.detach()

    return run


def test_jacobian_of_a_complex_output_raises_as_the_original():
    """The reported silent wrong answers: zeros for ``x * 1j`` at a real point, ``-i I``
    for ``1j * z`` at a complex one; the original raises."""
    message = "grad can be implicitly created only for real scalar outputs but got torch.complex128"
    for x in POINTS.values():
        with pytest.raises(RuntimeError, match=message):
            TAF.jacobian(lambda t: t * 1j, x)
        with pytest.raises(RuntimeError, match=message):
            AF.jacobian(lambda t: t * 1j, x)
        with pytest.raises(RuntimeError, match=message):
            AF.jacobian(lambda t: (t, t * 1j), (x,))
    with pytest.raises(RuntimeError, match=message):
        AF.hessian(lambda t: (t * t.conj()).real.sum(), POINTS["complex"])


def test_complex_input_real_output_jacobian_is_the_conjugate_gradient_convention():
    """Where the original returns (a real output of a complex input) the value is its
    convention, d/dRe + i d/dIm, checked here against central differences."""
    z = POINTS["complex"]
    f = lambda t: (t * t.conj()).real * t.real
    J = AF.jacobian(f, z)
    eps = 1e-6
    fd = torch.stack(
        [
            (f(z + eps * e) - f(z - eps * e)) / (2 * eps) + 1j * (f(z + 1j * eps * e) - f(z - 1j * eps * e)) / (2 * eps)
            for e in torch.eye(3, dtype=C)
        ],
        dim=1,
    )
    torch.testing.assert_close(J, fd, rtol=1e-6, atol=1e-6)
    assert_same_outcome(lambda: AF.jacobian(f, z), lambda: TAF.jacobian(f, z))


# --------------------------------------------------------------------------------------
# In-place writes to an input: the original's error, in every mode and size.

LEAF = r"^a leaf Variable that requires grad is being used in an in-place operation\.$"
WRITES = {
    "mul_": lambda x: x.mul_(2),
    "view": lambda x: x[:2].mul_(2) * x,
    "setitem": lambda x: (x.__setitem__(0, 5.0), x * 1)[1],
    "copy_": lambda x: x.copy_(x.sin()),
}
SIZES = {"small": 4, "forward-mode size": SPECS["jvp"].min_numel}


def inplace_calls(f, x, v):
    s = lambda t: f(t).sum()
    return {
        "jvp": lambda m, **kw: m.jvp(f, x, v, **kw),
        "vjp": lambda m, **kw: m.vjp(f, x, v, **kw),
        "hvp": lambda m, **kw: m.hvp(s, x, v, **kw),
        "vhp": lambda m, **kw: m.vhp(s, x, v, **kw),
        "jacobian": lambda m, **kw: m.jacobian(f, x, **kw),
        "jacobian vectorize": lambda m, **kw: m.jacobian(f, x, vectorize=True, **kw),
        "hessian": lambda m, **kw: m.hessian(s, x, **kw),
    }


INPLACE_CASES = [  # Jacobians and Hessians: one row per element, the small size covers every engine
    (api, size)
    for api in inplace_calls(None, None, None)
    for size in SIZES
    if size == "small" or not api.startswith(("jacobian", "hessian"))
]


@pytest.mark.parametrize("write", list(WRITES))
@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("api, size", INPLACE_CASES)
def test_in_place_write_to_an_input_raises_as_the_original(api, size, create_graph, write):
    n = SIZES[size]
    x, v = torch.linspace(-1, 1, n, dtype=D), torch.ones(n, dtype=D)
    saved = x.clone()
    new = lambda: inplace_calls(WRITES[write], x, v)[api](AF, create_graph=create_graph)
    old = lambda: inplace_calls(WRITES[write], x, v)[api](TAF, create_graph=create_graph)
    assert_same_outcome(new, old, create_graph=create_graph)
    assert torch.equal(x, saved), "the caller's tensor was written"
    with pytest.raises(RuntimeError, match="in-place operation"):
        new()


@pytest.mark.parametrize("write", list(WRITES))
@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("vectorize", [False, True])
def test_in_place_write_under_forward_mode_jacobian_never_writes_the_caller(write, create_graph, vectorize):
    """Forward mode: the original refuses it without ``vectorize=True`` or with
    ``create_graph=True`` (its errors, raised by the drop-in too), and otherwise lets
    ``func`` write the caller's tensor and returns. The drop-in returns the original's
    numbers and leaves the caller's tensor as it was; the forward-over-reverse Hessian
    raises autograd's error, as the original's."""
    x = torch.linspace(-1, 1, 4, dtype=D)
    saved = x.clone()
    kw = {"strategy": "forward-mode", "vectorize": vectorize, "create_graph": create_graph}
    on_copy = x.clone()
    assert_same_outcome(lambda: AF.jacobian(WRITES[write], x, **kw), lambda: TAF.jacobian(WRITES[write], on_copy, **kw))
    assert torch.equal(x, saved)
    h = lambda t: WRITES[write](t).sum()
    kw = {"outer_jacobian_strategy": "forward-mode", "vectorize": True}
    assert_same_outcome(lambda: AF.hessian(h, x, **kw), detached(lambda: TAF.hessian(h, on_copy, **kw)))
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad is being used in an in-place"):
        AF.hessian(h, x, **kw)
    assert torch.equal(x, saved)


def test_in_place_jvp_message_is_the_originals(monkeypatch):
    monkeypatch.setitem(SPECS, "jvp", dataclasses.replace(SPECS["jvp"], min_numel=0))
    x = torch.ones(3, dtype=D)
    with pytest.raises(RuntimeError, match=LEAF):
        AF.jvp(lambda t: t.mul_(2), x, x.clone())
    assert torch.equal(x, torch.ones(3, dtype=D))


@pytest.mark.parametrize("size", list(SIZES))
def test_in_place_on_intermediates_is_fine(size):
    """Writing a tensor computed inside ``func`` is no write to an input: same results."""
    n = SIZES[size]
    x, v = torch.linspace(-1, 1, n, dtype=D), torch.ones(n, dtype=D)
    f = lambda t: (t * 2).mul_(t)
    assert_same_outcome(lambda: AF.jvp(f, x, v), lambda: TAF.jvp(f, x, v))
    small = x[:4]
    assert_same_outcome(
        lambda: AF.jacobian(f, small, strategy="forward-mode"), lambda: TAF.jacobian(f, small, vectorize=True)
    )


def test_forward_mode_fallback_never_writes_the_caller():
    """A func torch.func cannot run (reading its input's storage through numpy) that also
    writes its input: the call reruns the original's forward mode, which would write the
    caller's tensor; it runs on copies instead and returns the original's numbers."""

    def f(t):
        scale = float(t.detach().numpy().sum())  # refused under torch.func: fails before the write
        return t.mul_(2) * scale

    x = torch.linspace(-1, 1, 4, dtype=D)
    saved = x.clone()
    got = AF.jacobian(f, x, vectorize=True, strategy="forward-mode")
    assert torch.equal(x, saved)
    expected = TAF.jacobian(f, x.clone(), vectorize=True, strategy="forward-mode")
    torch.testing.assert_close(got, expected)


def test_in_place_with_create_graph_on_a_non_leaf_writes_no_more_than_the_original(monkeypatch):
    """With ``create_graph=True`` an input that is a non-leaf of the user's graph reaches
    ``func`` as a view (the original's ``_grad_preprocess``), and autograd lets a write
    through: the original writes the caller's tensor, once. The drop-in (whose core
    refuses the write on its own copy, then reruns the original) writes it once too,
    never twice."""
    monkeypatch.setitem(SPECS, "jvp", dataclasses.replace(SPECS["jvp"], min_numel=0))
    base = torch.linspace(-1, 1, 4, dtype=D).requires_grad_()
    f = lambda t: t.mul_(2) * t
    x_new, x_old = base * 1, base * 1
    TAF.jvp(f, x_old, torch.ones(4, dtype=D), create_graph=True)
    outcome(lambda: AF.jvp(f, x_new, torch.ones(4, dtype=D), create_graph=True))
    torch.testing.assert_close(x_old, 2 * base)
    torch.testing.assert_close(x_new, x_old)


# --------------------------------------------------------------------------------------
# The spec table: what differs between the APIs is data.


def test_no_api_name_branching_outside_the_spec_table():
    """The adapter reads each API's Spec; no module of the room compares an API's name."""
    names = "|".join(SPECS)
    for module in ("_api", "_checks", "_compute", "_engine", "_spec", "_strict"):
        source = inspect.getsource(importlib.import_module(f"{room.__name__}.{module}"))
        assert not re.search(rf"(==|!=|\bin)\s*\(?\s*['\"]({names})['\"]", source), module
    assert {s.name for s in SPECS.values()} == {"vjp", "jvp", "jacobian", "hessian", "vhp", "hvp"}
    assert all(dataclasses.is_dataclass(s) and s.__dataclass_params__.frozen for s in SPECS.values())
