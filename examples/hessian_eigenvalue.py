"""The top eigenvalue of a loss Hessian by power iteration with ``functx.hvp``.

The Hessian of a network's loss with respect to its parameters is never formed: each
power iteration step is one Hessian-vector product (``functx.hvp``, about the cost of
two gradients), on the parameter dict that ``functx.nn.make_functional`` returns; the
pytree helpers ``functx.tree_norm``, ``tree_scale`` and ``tree_vdot`` normalise it and
take the Rayleigh quotient. The estimate is checked against the eigenvalues of the dense
Hessian, which this small model still allows (``functx.hessian`` on the raveled
parameters). ``functx.curvature.eigsh`` does this (Lanczos, over a dataset) at scale.

Run: `python examples/hessian_eigenvalue.py [--plot PATH]`
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import functx
import functx.nn

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
help_plot = "save a figure of the convergence (needs matplotlib)"
parser.add_argument("--plot", metavar="PATH", help=help_plot)
args = parser.parse_args()

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
fmodel, params, buffers = functx.nn.make_functional(model)
x, y = torch.randn(128, 6, dtype=torch.float64), torch.randint(0, 3, (128,))
loss = lambda p: F.cross_entropy(fmodel(p, buffers, x), y)


def top_eigenvalue(loss, params, iterations: int) -> tuple[torch.Tensor, list[float]]:
    """Power iteration v <- H v / |H v|: the Rayleigh quotient and its history."""
    v = {k: torch.randn_like(t) for k, t in params.items()}
    history = []
    for _ in range(iterations):
        v = functx.tree_scale(1 / functx.tree_norm(v), v)
        # one Hessian-vector product; the gradient comes for free
        (_,), (Hv,) = functx.hvp(loss, (params,), (v,))
        # the Rayleigh quotient v^T H v, |v| = 1
        history.append(functx.tree_vdot(v, Hv).item())
        v = Hv
    return torch.tensor(history[-1], dtype=torch.float64), history


estimate, history = top_eigenvalue(loss, params, iterations=50)

# Reference: the dense Hessian of the raveled parameters (163 x 163 here).
flat, unravel = functx.ravel_pytree(params)
dense = functx.hessian(lambda theta: loss(unravel(theta)))(flat)
eigenvalues = torch.linalg.eigvalsh(dense)
low, high = eigenvalues[0].item(), eigenvalues[-1].item()
print(f"{flat.numel()} parameters; dense Hessian eigenvalues {low:.4f} to {high:.4f}")
for i in (0, 4, 9, 19, 49):
    print(f"power iteration step {i + 1:3d}: {history[i]:.4f}")
# Power iteration finds the eigenvalue of largest magnitude; here that is the top one.
assert eigenvalues[-1].abs() >= eigenvalues[0].abs()
torch.testing.assert_close(estimate, eigenvalues[-1], rtol=1e-4, atol=0.0)
print(f"top eigenvalue by power iteration {estimate:.4f} == dense {high:.4f} (to 1e-4)")

if args.plot:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no figure")
    else:
        fig, ax = plt.subplots(figsize=(5, 3))
        errors = [abs(h - high) + 1e-16 for h in history]
        ax.semilogy(range(1, len(history) + 1), errors)
        ax.set_xlabel("power iteration step (one functx.hvp each)")
        ax.set_ylabel("|estimate - top eigenvalue|")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"figure saved to {args.plot}")
