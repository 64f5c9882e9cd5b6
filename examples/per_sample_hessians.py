"""Per-sample Hessians of a loss with respect to an nn.Module's parameters.

`functx.nn.make_functional` turns the model into a pure function of a dict of parameters
(the model itself is never modified), `functx.hessian` differentiates it twice, and
`functx.vmap` maps over the samples of a batch. The result is checked against a loop of
`torch.autograd.functional.hessian` over the samples.

Run: `python examples/per_sample_hessians.py`
"""

import time

import torch
from torch import nn

import functx
import functx.nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
fmodel, params, buffers = functx.nn.make_functional(model)
n_params = sum(p.numel() for p in params.values())
x = torch.randn(32, 8, dtype=torch.float64)
y = torch.randint(0, 4, (32,))


def loss(params, x, y):
    """Cross-entropy of one sample."""
    logits = fmodel(params, buffers, x)
    return torch.nn.functional.cross_entropy(logits[None], y[None])


# H[a][b] has shape (batch, *params[a].shape, *params[b].shape).
per_sample_hessians = functx.vmap(functx.hessian(loss), in_dims=(None, 0, 0))
for _ in range(
    5
):  # the first calls pay one-time setup (see the Sharp bits page): warm up
    H = per_sample_hessians(params, x, y)
times = []
for _ in range(5):
    start = time.perf_counter()
    H = per_sample_hessians(params, x, y)
    times.append(time.perf_counter() - start)
elapsed = sorted(times)[2]  # the median of 5 calls
names = list(params)
dense = torch.cat(
    [
        torch.cat(
            [H[a][b].reshape(32, params[a].numel(), params[b].numel()) for b in names],
            2,
        )
        for a in names
    ],
    1,
)
print(
    f"{len(x)} per-sample Hessians of a {n_params}-parameter MLP: "
    f"{tuple(dense.shape)} in {elapsed * 1e3:.1f} ms"
)

# Reference for a few samples: torch.autograd.functional.hessian on the raveled
# parameters.
flat, unravel = functx.ravel_pytree(params)
torch.autograd.functional.hessian(
    lambda theta: loss(unravel(theta), x[0], y[0]), flat
)  # warm-up
start = time.perf_counter()
for i in range(4):
    expected = torch.autograd.functional.hessian(
        lambda theta: loss(unravel(theta), x[i], y[i]), flat
    )
    # ravel_pytree orders leaves by sorted key, as the functx pytree policy does
    order = sorted(names)
    perm = torch.cat(
        [
            torch.arange(params[a].numel())
            + sum(params[b].numel() for b in order[: order.index(a)])
            for a in names
        ]
    )
    torch.testing.assert_close(
        dense[i], expected[perm][:, perm], rtol=1e-10, atol=1e-12
    )
loop = (time.perf_counter() - start) / 4 * len(x)
print(
    "matches torch.autograd.functional.hessian; a loop of it would take "
    f"~{loop * 1e3:.0f} ms for the batch"
)
print(
    "(median of 5 calls after 5 warm-up calls; timings vary with load: "
    "docs/benchmarks.md has measured ratios)"
)

# What per-sample curvature tells us: the spread of the top eigenvalue across samples.
top = torch.linalg.eigvalsh(dense)[:, -1]
print(
    f"top Hessian eigenvalue per sample: min {top.min():.3f}, median "
    f"{top.median():.3f}, max {top.max():.3f}"
)
# The mean of per-sample Hessians is the Hessian of the mean loss.
H_mean = functx.hessian(
    lambda p: torch.nn.functional.cross_entropy(fmodel(p, buffers, x), y)
)(params)
torch.testing.assert_close(
    H["2.weight"]["0.bias"].mean(0),
    H_mean["2.weight"]["0.bias"],
    rtol=1e-10,
    atol=1e-12,
)
print("mean of per-sample Hessians == Hessian of the mean loss")
