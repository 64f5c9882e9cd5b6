"""functx transforms trace under torch.compile(fullgraph=True) with no graph breaks.

One compiled function covers every core transform at least once (vjp, jvp, linearize,
jacrev, jacfwd, hessian in each mode, hvp in each mode, grad, value_and_grad, vmap) and the
representative compositions; compiling is slow on CPU, so one graph keeps this test to a
single compilation."""

import pytest
import torch
from helpers import Params, assert_tree_allclose

import functx

D = torch.float64


def loss(p: Params, x, y):
    return ((torch.tanh(x @ p.w) @ p.b - y) ** 2).mean()


def everything(p, x, y, v):
    per_sample_H = functx.vmap(functx.hessian(loss), in_dims=(None, 0, 0))(p, x[:, None], y[:, None])
    H_rr = functx.hessian(loss, mode="rev-rev")(p, x, y)
    H_fr = functx.hessian(loss, mode="fwd-rev")(p, x, y)
    per_sample_g = functx.vmap(functx.grad(loss), in_dims=(None, 0, 0))(p, x[:, None], y[:, None])
    value, g = functx.value_and_grad(loss)(p, x, y)
    scalar = lambda p: loss(p, x, y)
    hvps = [functx.hvp(scalar, (p,), (v,), mode=m)[1] for m in ("rev-rev", "fwd-rev", "rev-fwd")]
    net = lambda p: torch.tanh(x @ p.w)
    Jf, Jr = functx.jacfwd(net)(p), functx.jacrev(net)(p)
    out, vjp_fn = functx.vjp(net, p)
    ct = vjp_fn(torch.ones_like(out))
    _, tangent = functx.jvp(net, (p,), (v,))
    _, jvp_fn = functx.linearize(net, p)
    return per_sample_H, H_rr, H_fr, per_sample_g, value, g, hvps, Jf, Jr, ct, tangent, jvp_fn(v)


@pytest.mark.filterwarnings("ignore")
def test_compiled_transforms_match_eager_without_graph_breaks():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    p = Params(w=torch.randn(3, 4, dtype=D, generator=g), b=torch.randn(4, dtype=D, generator=g))
    x, y = torch.randn(6, 3, dtype=D, generator=g), torch.randn(6, dtype=D, generator=g)
    v = Params(w=torch.randn(3, 4, dtype=D, generator=g), b=torch.randn(4, dtype=D, generator=g))
    compiled = torch.compile(everything, fullgraph=True, backend="inductor")
    assert_tree_allclose(compiled(p, x, y, v), everything(p, x, y, v), rtol=1e-9, atol=1e-9)
    # a second call with new values reuses the graph and is still right
    x2 = x + 0.5
    assert_tree_allclose(compiled(p, x2, y, v), everything(p, x2, y, v), rtol=1e-9, atol=1e-9)
