"""functx quick start: pytree parameters, per-sample gradients, a Hessian and an hvp.

Run with `make demo` (or `python examples/quickstart.py` inside the venv).
"""

import optree
import torch

import functx

torch.manual_seed(0)


# Parameters can be any optree pytree: dicts, tuples, namedtuples, or dataclasses
# registered with optree (torch.func rejects dataclasses; functx does not).
@optree.dataclasses.dataclass(namespace="functx")
class MLP:
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor


def predict(params: MLP, x: torch.Tensor) -> torch.Tensor:
    hidden = torch.tanh(x @ params.w1 + params.b1)
    return hidden @ params.w2 + params.b2


def loss(params: MLP, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((predict(params, x) - y) ** 2).mean()


params = MLP(
    w1=torch.randn(3, 8, dtype=torch.float64) / 3**0.5,
    b1=torch.zeros(8, dtype=torch.float64),
    w2=torch.randn(8, 1, dtype=torch.float64) / 8**0.5,
    b2=torch.zeros(1, dtype=torch.float64),
)
x = torch.randn(16, 3, dtype=torch.float64)
y = torch.randn(16, 1, dtype=torch.float64)

# 1. Gradients come back in the structure of the parameters.
value, grads = functx.value_and_grad(loss)(params, x, y)
print(f"loss = {value.item():.4f}; grad w.r.t. w1 has shape {tuple(grads.w1.shape)}")

# 2. Per-sample gradients: vmap over the data, broadcast the parameters.
per_sample = functx.vmap(functx.grad(loss), in_dims=(None, 0, 0))(
    params, x[:, None], y[:, None]
)
print(f"per-sample grads of w1: {tuple(per_sample.w1.shape)}")
assert torch.allclose(per_sample.w1.mean(0), grads.w1)

# 3. A dense Hessian, nested as params x params (reverse-over-reverse on CPU).
H = functx.hessian(loss)(params, x, y)
print(f"Hessian block d2L/dw2 dw2: {tuple(H.w2.w2.shape)}")

# 4. A Hessian-vector product without forming the Hessian, checked against central
#    finite differences of the gradient along v.
v = optree.tree_map(torch.randn_like, params, namespace="functx")
_, (Hv,) = functx.hvp(lambda p: loss(p, x, y), (params,), (v,))
eps = 1e-6
shifted = [
    optree.tree_map(lambda p, t: p + s * t, params, v, namespace="functx")
    for s in (eps, -eps)
]
g_plus, g_minus = (functx.grad(loss)(p, x, y) for p in shifted)
assert torch.allclose(Hv.w1, (g_plus.w1 - g_minus.w1) / (2 * eps), atol=1e-6)
print(
    "hvp matches finite differences of the gradient: |Hv.w1| = "
    f"{Hv.w1.norm().item():.4f}"
)

# 5. Transforms compose: per-sample Hessians, and jvp of grad.
per_sample_H = functx.vmap(functx.hessian(loss), in_dims=(None, 0, 0))(
    params, x[:, None], y[:, None]
)
print(f"per-sample Hessians of b1: {tuple(per_sample_H.b1.b1.shape)}")
