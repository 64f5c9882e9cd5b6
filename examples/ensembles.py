"""Train an ensemble of five MLPs at once with ``functx.nn.stack`` and ``functx.vmap``.

``functx.nn.stack(members)`` returns one pure function and the members' parameters
stacked along a new leading dimension; ``functx.vmap`` over that dimension runs (and
differentiates) all members in one batched call instead of a Python loop. Each member
starts from its own random initialisation, so the ensemble's spread is an (informal)
uncertainty estimate: small where there is training data, large away from it. Checks:
the vmapped gradients equal each member's own gradient; the trained ensemble fits the
data.

Run: `python examples/ensembles.py [--plot PATH]`
"""

import argparse

import torch
from torch import nn

import functx
import functx.nn

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument(
    "--plot",
    metavar="PATH",
    help="save a figure of the ensemble's predictions (needs matplotlib)",
)
args = parser.parse_args()

torch.manual_seed(0)
MEMBERS, STEPS, LR = 5, 100, 0.02

x = torch.cat([torch.linspace(-3, -1, 20), torch.linspace(1, 3, 20)])[
    :, None
]  # a gap in (-1, 1)
y = torch.sin(2 * x) + 0.1 * torch.randn_like(x)
members = [
    nn.Sequential(
        nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
    )
    for _ in range(MEMBERS)
]
fmodel, params, buffers = functx.nn.stack(members)  # params["0.weight"]: (5, 32, 1)


def loss(p, b, x, y):
    return ((fmodel(p, b, x) - y) ** 2).mean()


ensemble_value_and_grad = functx.vmap(
    functx.value_and_grad(loss), in_dims=(0, 0, None, None)
)

# 1. The batched gradients equal each member's own.
losses, grads = ensemble_value_and_grad(params, buffers, x, y)
for m, member in enumerate(members):
    expected = torch.autograd.grad(
        ((member(x) - y) ** 2).mean(), list(member.parameters())
    )
    for name, e in zip(params, expected):
        torch.testing.assert_close(grads[name][m], e, rtol=1e-5, atol=1e-6)
print(f"vmapped gradients of {MEMBERS} members match each member's torch.autograd.grad")

# 2. Train all members at once: Adam, written on the stacked dicts (plain tensors).
m = {k: torch.zeros_like(t) for k, t in params.items()}
v = {k: torch.zeros_like(t) for k, t in params.items()}
for step in range(1, STEPS + 1):
    losses, grads = ensemble_value_and_grad(params, buffers, x, y)
    for k in params:
        m[k] = 0.9 * m[k] + 0.1 * grads[k]
        v[k] = 0.999 * v[k] + 0.001 * grads[k] ** 2
        params[k] = params[k] - LR * (m[k] / (1 - 0.9**step)) / (
            (v[k] / (1 - 0.999**step)).sqrt() + 1e-8
        )
    if step == 1 or step % 50 == 0:
        print(
            f"step {step:4d}  training loss per member: "
            + " ".join(f"{v:.3f}" for v in losses.tolist())
        )
assert (losses < 0.05).all(), losses

# 3. Predictions: the members agree on the data and disagree in the gap.
grid = torch.linspace(-4, 4, 161)[:, None]
predictions = functx.vmap(fmodel, in_dims=(0, 0, None))(params, buffers, grid)[
    ..., 0
]  # (5, 161)
spread = predictions.std(0)
in_gap, on_data = (
    grid[:, 0].abs() < 0.5,
    (grid[:, 0].abs() > 1.2) & (grid[:, 0].abs() < 2.8),
)
print(
    f"ensemble spread (std over members): {spread[on_data].mean():.3f} on the data, "
    f"{spread[in_gap].mean():.3f} in the gap"
)
assert spread[in_gap].mean() > 2 * spread[on_data].mean()

if args.plot:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no figure")
    else:
        fig, ax = plt.subplots(figsize=(6, 3))
        for m in range(MEMBERS):
            ax.plot(grid[:, 0], predictions[m].detach(), lw=1, alpha=0.7)
        ax.scatter(x[:, 0], y[:, 0], s=8, c="k", label="training data")
        ax.set_xlabel("x")
        ax.set_ylabel("prediction")
        ax.legend(loc="lower left")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"figure saved to {args.plot}")
