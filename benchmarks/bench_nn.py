"""functx.nn benchmarks: per-sample Hessians and per-call overhead, as ratios.

1. Per-sample Hessians of an MLP loss with respect to its parameters (batch 32, 212
   parameters): functx (`vmap(hessian(loss))` over `functx.nn.make_functional`) against a
   loop of `torch.autograd.functional.hessian` and against the torch.func recipes
   (`vmap(hessian(...))`, `vmap(jacrev(jacrev(...)))` and `vmap(jacrev(grad(...)))` over
   `functional_call`).
2. Per-call overhead of `fmodel(params, buffers, x)` against
   `torch.func.functional_call(model, (params, buffers), (x,))` and a plain `model(x)`.

Candidates are timed side by side, interleaved round by round (`_timing.compare`), and
the tables report medians and ratios (the machine is shared: absolute times are noisy,
ratios taken in one run are not). Run: `python benchmarks/bench_nn.py [--quick]`.
"""

from __future__ import annotations

import argparse

import torch
from _timing import compare, fmt_time, markdown_table, setup_threads
from torch import nn
from torch.func import functional_call

import functx
import functx.nn


def per_sample_hessians(quick: bool) -> list[tuple[str, float, float]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    fmodel, params, buffers = functx.nn.make_functional(model)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    names = list(params)

    def loss(p, xi, yi):
        return nn.functional.cross_entropy(fmodel(p, buffers, xi)[None], yi[None])

    def loss_tf(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, p, (xi,))[None], yi[None])

    def loss_tuple(i):
        return lambda *ps: nn.functional.cross_entropy(
            functional_call(model, dict(zip(names, ps)), (x[i],))[None], y[None, i]
        )

    loop_samples = 4 if quick else 32
    fast = {
        "functx vmap(hessian)": lambda: functx.vmap(functx.hessian(loss), in_dims=(None, 0, 0))(params, x, y),
        "torch.func vmap(hessian)": lambda: torch.func.vmap(torch.func.hessian(loss_tf), in_dims=(None, 0, 0))(
            params, x, y
        ),
        "torch.func vmap(jacrev(jacrev))": lambda: torch.func.vmap(
            torch.func.jacrev(torch.func.jacrev(loss_tf)), in_dims=(None, 0, 0)
        )(params, x, y),
        "torch.func vmap(jacrev(grad))": lambda: torch.func.vmap(
            torch.func.jacrev(torch.func.grad(loss_tf)), in_dims=(None, 0, 0)
        )(params, x, y),
        "functx vmap(jacrev(grad))": lambda: functx.vmap(functx.jacrev(functx.grad(loss)), in_dims=(None, 0, 0))(
            params, x, y
        ),
    }
    slow = {
        "loop of torch.autograd.functional.hessian": lambda: [
            torch.autograd.functional.hessian(loss_tuple(i), tuple(params.values())) for i in range(loop_samples)
        ],
    }
    _check_hessians(fast, names, params, loss_tuple)
    t = compare(fast, rounds=3 if quick else 15, warmup=2)
    # the slow loop runs a whole batch per round, after the fast candidates
    t.update({k: v * 32 / loop_samples for k, v in compare(slow, rounds=1 if quick else 5, warmup=0).items()})
    return [(name, seconds, seconds / t["functx vmap(hessian)"]) for name, seconds in t.items()]


def _check_hessians(fast, names, params, loss_tuple) -> None:
    """All recipes agree with torch.autograd.functional on sample 0 before timing them."""
    expected = torch.autograd.functional.hessian(loss_tuple(0), tuple(params.values()))
    for label, fn in fast.items():
        H = fn()
        for a, row in zip(names, expected):
            for b, block in zip(names, row):
                torch.testing.assert_close(H[a][b][0], block, rtol=1e-4, atol=1e-5, msg=lambda m: f"{label}: {m}")


def overhead(quick: bool) -> list[tuple[str, str, float, float]]:
    torch.manual_seed(0)
    cases = {
        "MLP 10-32-32-1, batch 8": (
            nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)),
            torch.randn(8, 10),
        ),
        "CNN + BatchNorm (eval), batch 8": (
            nn.Sequential(
                nn.Conv2d(3, 8, 3),
                nn.BatchNorm2d(8),
                nn.ReLU(),
                nn.Conv2d(8, 8, 3),
                nn.BatchNorm2d(8),
                nn.ReLU(),
                nn.Flatten(),
                nn.LazyLinear(10),
            ).eval(),
            torch.randn(8, 3, 12, 12),
        ),
        "TransformerEncoderLayer d=32, batch 4x16": (
            nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True),
            torch.randn(4, 16, 32),
        ),
    }
    rows = []
    for label, (model, x) in cases.items():
        model(x)  # materialise lazy layers
        fmodel, params, buffers = functx.nn.make_functional(model)
        both = {**params, **buffers}
        t = compare(
            {
                "fmodel(params, buffers, x)": lambda: fmodel(params, buffers, x),
                "torch.func.functional_call": lambda: functional_call(model, both, (x,)),
                "model(x)": lambda: model(x),
            },
            rounds=3 if quick else 15,
            warmup=20,
        )
        base = t["torch.func.functional_call"]
        rows += [(label, name, seconds, seconds / base) for name, seconds in t.items()]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds, loop reference on 4 samples (smoke mode)")
    quick = parser.parse_args().quick
    torch.set_num_threads(1)  # these problems are small; threads only add noise on a shared box
    print(f"{setup_threads()}, {'quick' if quick else 'full'} mode\n")
    print("Per-sample Hessians of an MLP loss (8-16-4, 212 parameters, batch 32, float32)\n")
    rows = [
        [name + (" (extrapolated from 4 samples)" if quick and "loop" in name else ""), fmt_time(t), f"{r:.2f}x"]
        for name, t, r in per_sample_hessians(quick)
    ]
    print(markdown_table(["method", "median per batch", "time / functx vmap(hessian)"], rows))
    print("\nPer-call overhead of a functional call (forward only, no autograd)\n")
    rows = [[label, name, fmt_time(t), f"{r:.2f}x"] for label, name, t, r in overhead(quick)]
    print(markdown_table(["model", "call", "median per call", "time / functional_call"], rows))


if __name__ == "__main__":
    main()
