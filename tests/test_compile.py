"""functx transforms trace under torch.compile(fullgraph=True) with no graph breaks.

One compiled function covers the representative compositions (compiling is slow on CPU:
one graph keeps this test to a single compilation)."""

import pytest
import torch
from helpers import Params, assert_tree_allclose

import functx

D = torch.float64


def loss(p: Params, x, y):
    return ((torch.tanh(x @ p.w) @ p.b - y) ** 2).mean()


def everything(p, x, y, v):
    per_sample_H = functx.vmap(functx.hessian(loss), in_dims=(None, 0, 0))(p, x[:, None], y[:, None])
    H = functx.hessian(loss, mode="fwd-rev")(p, x, y)
    per_sample_g = functx.vmap(functx.grad(loss), in_dims=(None, 0, 0))(p, x[:, None], y[:, None])
    _, Hv = functx.hvp(lambda p: loss(p, x, y), (p,), (v,))
    J = functx.jacfwd(lambda p: torch.tanh(x @ p.w))(p)
    return per_sample_H, H, per_sample_g, Hv, J


@pytest.mark.filterwarnings("ignore")
def test_compiled_compositions_match_eager_without_graph_breaks():
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
