"""The core transforms give the same numbers with torch's private names switched off
(`functx._torch_internals.switched_off`, the same switch as FUNCTX_TORCH_INTERNALS=off), so
every fallback in `_torch_internals` is exercised and correct."""

import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_tree_allclose, small_loss, small_net, small_problem

import functx
from functx import _torch_internals

D = torch.float64


def _catalogue():
    p, x, v = small_problem()
    xs = x[:, None]
    return {
        "grad": lambda: functx.grad(small_loss)(p, x),
        "value_and_grad": lambda: functx.value_and_grad(small_loss, argnums=(0, 1))(p, x),
        "grad(grad)": lambda: functx.grad(lambda x: functx.grad(small_loss, argnums=1)(p, x).sum())(x),
        "vjp": lambda: functx.vjp(small_net, p, x)[1](torch.ones(4, 2, dtype=D)),
        "jvp": lambda: functx.jvp(small_net, (p, x), (v, x)),
        "linearize": lambda: functx.linearize(small_net, p, x)[1](v, x),
        "jacrev": lambda: functx.jacrev(small_net)(p, x),
        "jacfwd": lambda: functx.jacfwd(small_net)(p, x),
        "hessian-rev-rev": lambda: functx.hessian(small_loss, mode="rev-rev")(p, x),
        "hessian-fwd-rev": lambda: functx.hessian(small_loss, mode="fwd-rev")(p, x),
        "hvp-rev-rev": lambda: functx.hvp(small_loss, (p, x), (v, x)),
        "hvp-fwd-rev": lambda: functx.hvp(small_loss, (p, x), (v, x), mode="fwd-rev"),
        "hvp-rev-fwd": lambda: functx.hvp(small_loss, (p, x), (v, x), mode="rev-fwd"),
        "vmap(grad)": lambda: functx.vmap(functx.grad(small_loss), in_dims=(None, 0))(p, xs),
        "vmap(hessian)": lambda: functx.vmap(functx.hessian(small_loss), in_dims=(None, 0))(p, xs),
        "jacrev-holomorphic": lambda: functx.jacrev(torch.exp, holomorphic=True)(x[0].to(torch.complex128)),
        "jacfwd-complex-input": lambda: functx.jacfwd(lambda z: z.abs() ** 2)(x[0].to(torch.complex128) * 1j),
    }


@pytest.mark.parametrize("name", sorted(_catalogue()))
def test_same_numbers_with_internals_switched_off(name):
    expected = _catalogue()[name]()
    with _torch_internals.switched_off():
        assert _torch_internals.transforms_active()  # the safe answer: no plain-autograd shortcut
        got = _catalogue()[name]()
    assert_tree_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_switch_restores_the_internals():
    with _torch_internals.switched_off():
        assert not _torch_internals.CAN_UNWRAP and _torch_internals.version(torch.ones(1)) is None
    assert _torch_internals.CAN_UNWRAP and _torch_internals.CAN_LIFT
    assert not _torch_internals.transforms_active()
    seen = []
    torch.func.grad(lambda x: seen.append(_torch_internals.transforms_active()) or x.sum())(torch.ones(2))
    assert seen == [True]


def test_inplace_write_still_refused_in_reverse_mode_when_switched_off():
    x = torch.ones(3, dtype=D)
    with _torch_internals.switched_off(), pytest.raises(RuntimeError, match="in-place"):
        functx.grad(lambda x: x.mul_(2).sum())(x)  # torch's own refusal: no version probe
    assert torch.equal(x, torch.ones(3, dtype=D))


def test_refusal_names_the_api():
    with pytest.raises(NotImplementedError, match=r"`functx.api`: forward rules needs torch internals"):
        _torch_internals.require(None, "forward rules", "api")


def test_environment_variable_switches_them_off():
    code = "from functx import _torch_internals as t; print(t.ENABLED, t.CAN_UNWRAP, t.transforms_active())"
    env = {**os.environ, "FUNCTX_TORCH_INTERNALS": "off", "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "True"]


def test_engine_grad_equals_torch_autograd_grad_and_declines_what_it_does_not_cover():
    x = torch.randn(4, dtype=D, requires_grad=True)
    unused = torch.randn(2, dtype=D, requires_grad=True)
    v = torch.randn(4, dtype=D)
    y = (x.sin() * x).sum()
    (g,) = _torch_internals.engine_grad([y], [x], None, True, None)
    (g_ref,) = torch.autograd.grad(y, x, create_graph=True)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=0)
    (h_ref,) = torch.autograd.grad(g_ref, x, v, retain_graph=True)  # g and g_ref share saved tensors
    h, none = _torch_internals.engine_grad([g], [x, unused], [v], False, None)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)
    assert none is None  # allow_unused, as autograd_grad asks
    z = x * 2
    assert _torch_internals.engine_grad([z], [x], None, False, True) is None  # non-scalar needs grad_outputs
    assert _torch_internals.engine_grad([z], [x], [v.float()], False, True) is None  # another dtype
    assert _torch_internals.engine_grad([z], [x], [v[:2]], False, True) is None  # another shape

    class Sub(torch.Tensor):
        pass

    assert _torch_internals.engine_grad([z], [x], [v.as_subclass(Sub)], False, True) is None

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Watch():  # a mode sees torch.autograd.grad: the engine is not called behind its back
        assert _torch_internals.engine_grad([z], [x], [v], False, True) is None
    seen = []
    torch.func.grad(lambda t: seen.append(_torch_internals.engine_grad([z], [x], [v], False, True)) or t.sum())(v)
    assert seen == [None]  # inside a transform: torch.autograd.grad runs
    with _torch_internals.switched_off():
        assert _torch_internals.engine_grad([z], [x], [v], False, True) is None
    torch.testing.assert_close(_torch_internals.engine_grad([z], [x], [v], False, None)[0], 2 * v)
