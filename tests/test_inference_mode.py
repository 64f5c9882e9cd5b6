"""Every transform matches torch.func inside ``torch.inference_mode()``, with inference
tensors used outside it, and under ``no_grad``/``enable_grad`` (float64 references from
torch.func itself)."""

import contextlib

import pytest
import torch
from helpers import assert_tree_allclose, small_loss, small_net, small_problem

import functx

D = torch.float64


def _pairs(p, x, v):
    """name -> (functx call, torch.func call), both returning a pytree of tensors."""
    tf = torch.func
    xs = x[:, None]
    ct = torch.ones(4, 2, dtype=D)
    return {
        "grad": (lambda: functx.grad(small_loss)(p, x), lambda: tf.grad(small_loss)(p, x)),
        "value_and_grad": (
            lambda: functx.value_and_grad(small_loss, argnums=(0, 1))(p, x),
            lambda: tf.grad_and_value(small_loss, argnums=(0, 1))(p, x)[::-1],
        ),
        "vjp": (lambda: functx.vjp(small_net, p, x)[1](ct), lambda: tf.vjp(small_net, p, x)[1](ct)),
        "jvp": (lambda: functx.jvp(small_net, (p, x), (v, x)), lambda: tf.jvp(small_net, (p, x), (v, x))),
        "linearize": (lambda: functx.linearize(small_net, p, x)[1](v, x), lambda: tf.jvp(small_net, (p, x), (v, x))[1]),
        "jacrev": (lambda: functx.jacrev(small_net)(p, x), lambda: tf.jacrev(small_net)(p, x)),
        "jacfwd": (lambda: functx.jacfwd(small_net)(p, x), lambda: tf.jacfwd(small_net)(p, x)),
        "hessian-rev-rev": (
            lambda: functx.hessian(small_loss, mode="rev-rev")(p, x),
            lambda: tf.hessian(small_loss)(p, x),
        ),
        "hessian-fwd-rev": (
            lambda: functx.hessian(small_loss, mode="fwd-rev")(p, x),
            lambda: tf.hessian(small_loss)(p, x),
        ),
        "hvp-rev-rev": (
            lambda: functx.hvp(lambda p: small_loss(p, x), (p,), (v,), mode="rev-rev")[1][0],
            lambda: tf.jvp(tf.grad(lambda p: small_loss(p, x)), (p,), (v,))[1],
        ),
        "hvp-fwd-rev": (
            lambda: functx.hvp(lambda p: small_loss(p, x), (p,), (v,), mode="fwd-rev")[1][0],
            lambda: tf.jvp(tf.grad(lambda p: small_loss(p, x)), (p,), (v,))[1],
        ),
        "hvp-rev-fwd": (
            lambda: functx.hvp(lambda p: small_loss(p, x), (p,), (v,), mode="rev-fwd")[1][0],
            lambda: tf.jvp(tf.grad(lambda p: small_loss(p, x)), (p,), (v,))[1],
        ),
        "vmap(grad)": (
            lambda: functx.vmap(functx.grad(small_loss), in_dims=(None, 0))(p, xs),
            lambda: tf.vmap(tf.grad(small_loss), in_dims=(None, 0))(p, xs),
        ),
        "vmap(hessian)": (
            lambda: functx.vmap(functx.hessian(small_loss), in_dims=(None, 0))(p, xs),
            lambda: tf.vmap(tf.hessian(small_loss), in_dims=(None, 0))(p, xs),
        ),
        "vmap(jvp)": (
            lambda: functx.vmap(lambda x: functx.jvp(lambda x: small_net(p, x), (x,), (x,))[1])(xs),
            lambda: tf.vmap(lambda x: tf.jvp(lambda x: small_net(p, x), (x,), (x,))[1])(xs),
        ),
    }


NAMES = sorted(_pairs(*small_problem()))
CONTEXTS = {
    "inference_mode": torch.inference_mode,
    "no_grad": torch.no_grad,
    "enable_grad": torch.enable_grad,
    "inference_mode+no_grad": lambda: _both(torch.inference_mode(), torch.no_grad()),
}


@contextlib.contextmanager
def _both(*contexts):
    with contextlib.ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield


def _reference(name):
    """torch.func's result for plain tensors, outside any mode."""
    return _pairs(*small_problem())[name][1]()


@pytest.mark.parametrize("context", sorted(CONTEXTS))
@pytest.mark.parametrize("name", NAMES)
def test_transforms_match_torch_func_under_modes(name, context):
    with CONTEXTS[context]():
        ours = _pairs(*small_problem())[name][0]()
    assert_tree_allclose(ours, _reference(name))


@pytest.mark.parametrize("name", NAMES)
def test_inference_tensors_used_outside_inference_mode(name):
    with torch.inference_mode():
        p, x, v = small_problem()
    assert x.is_inference()
    ours = _pairs(p, x, v)[name][0]()
    assert_tree_allclose(ours, _reference(name))
    assert x.is_inference() and not x.requires_grad  # the caller's tensors are untouched


@pytest.mark.parametrize("name", NAMES)
def test_inference_tensors_inside_inference_mode(name):
    with torch.inference_mode():
        ours = _pairs(*small_problem())[name][0]()
    assert_tree_allclose(ours, _reference(name))


def test_inplace_writes_are_still_refused_in_inference_mode():
    def f(x):
        x.mul_(2)
        return x.sum()

    x, t = torch.ones(3, dtype=D), torch.ones(3, dtype=D)
    with torch.inference_mode():
        for call in (lambda: functx.jvp(f, (x,), (t,)), lambda: functx.jacfwd(f)(x), lambda: functx.grad(f)(x)):
            with pytest.raises(ValueError, match="writes in place"):
                call()
    torch.testing.assert_close(x, torch.ones(3, dtype=D))
    torch.testing.assert_close(t, torch.ones(3, dtype=D))


def test_jvp_never_writes_the_callers_tangents():
    def f(x):
        x.mul_(2)
        return x.sum()

    x = torch.ones(3, dtype=D)
    with pytest.raises(ValueError, match="writes in place"):
        functx.jvp(f, (x,), (x,))  # the tangent is the primal itself
    torch.testing.assert_close(x, torch.ones(3, dtype=D))
