"""MAML on sine-wave regression with functx.nn: grad through an inner SGD step, vmapped
over tasks.

The model is an ordinary `nn.Sequential`; `functx.nn.make_functional` turns it into a
pure function of a dict of parameters (the module is never modified). One meta-step:

    adapted = params - alpha * grad(task_loss)(params, support)    # inner SGD step
    meta_loss = task_loss(adapted, query)                          # after adaptation
    meta_grads = vmap(grad(meta_loss), over tasks)(params, ...)    # grad of grad

The meta-gradient is checked once against plain autograd (create_graph=True) on a
closed-form copy of the network, then the meta-parameters are trained with Adam.

Run: `python examples/maml.py`
"""

import math

import torch
from torch import nn

import functx
import functx.nn

torch.manual_seed(0)
ALPHA, TASKS, SHOTS, STEPS = 0.02, 8, 10, 150

model = nn.Sequential(
    nn.Linear(1, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 1)
)
fmodel, params, buffers = functx.nn.make_functional(model)
reference_state = {k: v.clone() for k, v in model.state_dict().items()}


def sample_tasks(n: int) -> tuple[torch.Tensor, ...]:
    """Support and query sets of `n` sine tasks y = a sin(x + phase)."""
    amplitude = torch.rand(n, 1, 1) * 4.9 + 0.1
    phase = torch.rand(n, 1, 1) * math.pi
    xs, xq = torch.rand(n, SHOTS, 1) * 10 - 5, torch.rand(n, SHOTS, 1) * 10 - 5
    return xs, amplitude * torch.sin(xs + phase), xq, amplitude * torch.sin(xq + phase)


def task_loss(p, x, y):
    return ((fmodel(p, buffers, x) - y) ** 2).mean()


def adapt(p, xs, ys):
    g = functx.grad(task_loss)(p, xs, ys)
    return {k: p[k] - ALPHA * g[k] for k in p}


def meta_loss(p, xs, ys, xq, yq):
    return task_loss(adapt(p, xs, ys), xq, yq)


meta_value_and_grad = functx.vmap(
    functx.value_and_grad(meta_loss), in_dims=(None, 0, 0, 0, 0)
)

# 1. Check the meta-gradient of one task batch against plain autograd through the inner
# step.
batch = sample_tasks(TASKS)
losses, grads = meta_value_and_grad(params, *batch)
names = list(params)


def closed_form(p, x):
    h = torch.tanh(x @ p["0.weight"].T + p["0.bias"])
    h = torch.tanh(h @ p["2.weight"].T + p["2.bias"])
    return h @ p["4.weight"].T + p["4.bias"]


for t in range(TASKS):
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    xs, ys, xq, yq = (b[t] for b in batch)
    inner = torch.autograd.grad(
        ((closed_form(leaves, xs) - ys) ** 2).mean(),
        list(leaves.values()),
        create_graph=True,
    )
    adapted = {k: leaves[k] - ALPHA * g for k, g in zip(names, inner)}
    expected = torch.autograd.grad(
        ((closed_form(adapted, xq) - yq) ** 2).mean(), list(leaves.values())
    )
    for k, e in zip(names, expected):
        torch.testing.assert_close(grads[k][t], e, rtol=1e-4, atol=1e-6)
print(f"meta-gradient of {TASKS} tasks matches autograd through the inner step")

# 2. Meta-train with Adam (written on dicts: the parameters are plain tensors).
evaluation = sample_tasks(64)  # fixed new tasks, to compare initialisations
evaluate = functx.vmap(meta_loss, in_dims=(None, 0, 0, 0, 0))
initial = evaluate(params, *evaluation).mean()
m = {k: torch.zeros_like(v) for k, v in params.items()}
v = {k: torch.zeros_like(p) for k, p in params.items()}
lr, b1, b2 = 3e-3, 0.9, 0.999
window: list[
    float
] = []  # one batch of 8 random tasks is noisy: log the mean of the last 25 steps
averages = []
for step in range(1, STEPS + 1):
    losses, grads = meta_value_and_grad(params, *sample_tasks(TASKS))
    for k in params:
        g = grads[k].mean(0)
        m[k] = b1 * m[k] + (1 - b1) * g
        v[k] = b2 * v[k] + (1 - b2) * g * g
        params[k] = params[k] - lr * (m[k] / (1 - b1**step)) / (
            (v[k] / (1 - b2**step)).sqrt() + 1e-8
        )
    window = [*window[-24:], losses.mean().item()]
    if step % 25 == 0:
        averages.append(sum(window) / len(window))
        print(
            f"steps {step - 24:4d}-{step:<4d} meta-loss (query loss after one inner "
            f"step), mean: {averages[-1]:.3f}"
        )
assert averages[-1] < averages[0], averages

# 3. Evaluate on the new tasks: the learned initialisation adapts better in one step.
final = evaluate(params, *evaluation).mean()
print(
    f"64 new tasks, query loss after one inner step: {initial:.3f} from the initial "
    f"parameters, {final:.3f} from the meta-learned ones"
)
assert final < initial

# The module itself was never touched.
assert all(
    torch.equal(model.state_dict()[k], reference_state[k]) for k in reference_state
)
print("the nn.Module is unchanged")
