"""Per-sample gradient clipping (DP-SGD style) for a small CNN.

DP-SGD (Abadi et al., 2016) clips each sample's gradient to a norm bound C before
averaging and adds Gaussian noise, which needs the per-sample gradients of a batch:
``functx.vmap`` of ``functx.grad`` over ``functx.nn.make_functional(model)`` computes
all of them in one batched call, as a dict of tensors with a leading batch dimension.
Checks: the per-sample gradients match one ``torch.autograd.grad`` per sample; every
clipped gradient has norm at most C; training with clipped, noised gradients learns the
task.

Run: `python examples/dp_sgd.py`
"""

import torch
import torch.nn.functional as F
from torch import nn

import functx
import functx.nn

torch.manual_seed(0)
BATCH, STEPS, CLIP, NOISE, LR = 64, 40, 1.0, 0.5, 0.5


def make_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 images: class 1 has a vertical bar, class 0 a horizontal one, plus noise."""
    y = torch.randint(0, 2, (n,))
    x = 0.5 * torch.randn(n, 1, 8, 8)
    pos = torch.randint(1, 7, (n,))
    for i in range(n):
        if y[i]:
            x[i, 0, :, pos[i]] += 1.5
        else:
            x[i, 0, pos[i], :] += 1.5
    return x, y


model = nn.Sequential(
    nn.Conv2d(1, 4, 3, padding=1),
    nn.ReLU(),
    nn.MaxPool2d(2),
    nn.Flatten(),
    nn.Linear(4 * 4 * 4, 2),
)
fmodel, params, buffers = functx.nn.make_functional(model)


def sample_loss(p, x, y):
    """Cross-entropy of one sample (vmap removes the batch dimension: add it back)."""
    return F.cross_entropy(fmodel(p, buffers, x[None]), y[None])


per_sample_grads = functx.vmap(functx.grad(sample_loss), in_dims=(None, 0, 0))

# 1. Per-sample gradients against one autograd call per sample.
x, y = make_data(BATCH)
grads = per_sample_grads(params, x, y)  # {"0.weight": (64, 4, 1, 3, 3), ...}
for i in range(4):
    model.zero_grad()
    expected = torch.autograd.grad(
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), list(model.parameters())
    )
    for name, e in zip(params, expected):
        torch.testing.assert_close(grads[name][i], e, rtol=1e-4, atol=1e-6)
print(
    f"per-sample gradients of {BATCH} samples match torch.autograd.grad, sample by "
    "sample"
)


def clipped_noisy_mean(grads: dict, clip: float, noise: float) -> dict:
    """Clip each gradient to norm `clip`, sum, add N(0, (noise clip)^2), average."""
    norms = torch.sqrt(
        sum(g.flatten(1).pow(2).sum(1) for g in grads.values())
    )  # (batch,)
    scale = (clip / (norms + 1e-12)).clamp(max=1.0)
    out = {}
    for name, g in grads.items():
        clipped = g * scale.view(-1, *[1] * (g.dim() - 1))
        out[name] = (clipped.sum(0) + noise * clip * torch.randn_like(g[0])) / len(
            scale
        )
    return out


norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
scale = (CLIP / norms).clamp(max=1.0)
clipped_norms = norms * scale
assert (clipped_norms <= CLIP + 1e-5).all()
print(
    f"per-sample gradient norms: median {norms.median():.2f}, max {norms.max():.2f}; "
    f"after clipping max {clipped_norms.max():.2f}"
)

# 2. Train with DP-SGD updates (the privacy accounting is out of scope here).
x_test, y_test = make_data(512)
accuracy = lambda p: (
    (fmodel(p, buffers, x_test).argmax(1) == y_test).float().mean().item()
)
print(f"test accuracy before training: {accuracy(params):.2f}")
for step in range(1, STEPS + 1):
    x, y = make_data(BATCH)
    update = clipped_noisy_mean(per_sample_grads(params, x, y), CLIP, NOISE)
    params = {k: params[k] - LR * update[k] for k in params}
    if step % 20 == 0:
        print(f"step {step:3d}  test accuracy {accuracy(params):.2f}")
final = accuracy(params)
assert final > 0.9, final
print(
    f"DP-SGD (clip {CLIP}, noise multiplier {NOISE}) reached test accuracy {final:.2f}"
)
