"""The empirical neural tangent kernel of an MLP, Theta(x1, x2) = J(x1) J(x2)^T.

J(x) is the Jacobian of the network's output at x with respect to all its parameters.
``functx.vmap(functx.jacrev(...))`` gives the per-sample Jacobians of a batch as a dict
of tensors (one per parameter), and the kernel is the sum over parameters of their
contractions. Checks: the kernel equals the one built from a loop of
``torch.autograd.functional.jacobian``, is symmetric positive semi-definite, and kernel
regression with it interpolates the training targets.

Run: `python examples/ntk.py`
"""

import torch
from torch import nn

import functx
import functx.nn

torch.manual_seed(0)
D = torch.float64
model = nn.Sequential(
    nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)
).to(D)
fmodel, params, buffers = functx.nn.make_functional(model)
n_params = sum(t.numel() for t in params.values())


def f(p, x):
    """The scalar output for one input x of shape (2,)."""
    return fmodel(p, buffers, x[None])[0, 0]


def ntk(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Theta[i, j] = <J(x1[i]), J(x2[j])>, summed over every parameter tensor."""
    per_sample_jacobian = functx.vmap(functx.jacrev(f), in_dims=(None, 0))
    j1, j2 = (
        per_sample_jacobian(params, x1),
        per_sample_jacobian(params, x2),
    )  # {name: (n, *shape)}
    return sum(j1[k].flatten(1) @ j2[k].flatten(1).T for k in params)


x_train = torch.rand(24, 2, dtype=D) * 4 - 2
y_train = torch.sin(x_train[:, 0]) * torch.cos(x_train[:, 1])
theta = ntk(x_train, x_train)
print(
    f"NTK of a {n_params}-parameter MLP on {len(x_train)} points: {tuple(theta.shape)}"
)

# 1. Reference: a loop of torch.autograd.functional.jacobian on the raveled parameters.
flat, unravel = functx.ravel_pytree(params)
rows = torch.stack(
    [
        torch.autograd.functional.jacobian(lambda w: f(unravel(w), xi), flat)
        for xi in x_train
    ]
)
torch.testing.assert_close(theta, rows @ rows.T, rtol=1e-10, atol=1e-10)
print("matches J J^T from a loop of torch.autograd.functional.jacobian")

# 2. Symmetric positive semi-definite.
torch.testing.assert_close(theta, theta.T, rtol=1e-12, atol=1e-12)
eigenvalues = torch.linalg.eigvalsh(theta)
assert eigenvalues.min() > -1e-8 * eigenvalues.max()
print(f"eigenvalues from {eigenvalues.min():.3g} to {eigenvalues.max():.3g} (PSD)")

# 3. Kernel regression with the NTK (what an infinitely wide network trained to
# convergence does).
x_test = torch.rand(200, 2, dtype=D) * 4 - 2
y_test = torch.sin(x_test[:, 0]) * torch.cos(x_test[:, 1])
alpha = torch.linalg.solve(theta + 1e-6 * torch.eye(len(x_train), dtype=D), y_train)
fit = theta @ alpha
test_prediction = ntk(x_test, x_train) @ alpha
train_error = (fit - y_train).abs().max().item()
test_rmse = (test_prediction - y_test).pow(2).mean().sqrt().item()
print(
    f"NTK regression: max training error {train_error:.1e}, test RMSE {test_rmse:.3f} "
    f"(target std {y_test.std():.3f})"
)
assert train_error < 1e-2 and test_rmse < 0.5 * y_test.std().item()
