"""The loss curvature of a small CNN over a whole dataset: top eigenvalues, trace, the
diagonal of one layer and the spectral density of the Hessian, with `functx.curvature`.

The data are synthetic (a random teacher network labels random images: no downloads).
The CNN is trained briefly, then `HessianOperator` applies the Hessian of the mean loss
over all batches matrix-free; the estimators only need its products. The script checks
its own results (eigenpair residuals, the layer diagonal against the exact one, the
density's mass).

Run: `python examples/hessian_spectrum.py` (add `--plot PATH` to choose where the PNG
goes; the plot needs matplotlib: `pip install functx[plot]`). Several processes:
`torchrun --nproc_per_node=2 examples/hessian_spectrum.py` shards the batches over the
ranks and prints the same numbers (rank 0 prints).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from torch import nn

import functx.curvature as fc

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)  # float64: the checks below are tight
torch.set_num_threads(
    1
)  # a small model: one thread per process (torchrun: one process per core)


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.Tanh(),
        nn.Conv2d(4, 6, 3, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 10),
    )


def synthetic_batches(
    num: int = 4, size: int = 64
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    teacher = cnn()
    with torch.no_grad():
        batches = []
        for _ in range(num):
            X = torch.randn(size, 1, 10, 10)
            batches.append((X, teacher(X).argmax(dim=1)))
    return batches


def train(model: nn.Module, batches: list, steps: int = 60) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        X, y = batches[step % len(batches)]
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()


def setup_distributed() -> tuple[int, int]:
    """Under torchrun: a gloo process group; each rank takes every world-th batch."""
    if "RANK" not in os.environ:
        return 0, 1
    torch.distributed.init_process_group("gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--plot",
        default=os.path.join(tempfile.gettempdir(), "functx_hessian_spectrum.png"),
    )
    args = parser.parse_args()
    rank, world = setup_distributed()
    say = print if rank == 0 else (lambda *a, **k: None)
    start = time.perf_counter()

    batches = synthetic_batches()
    model = cnn()
    train(model, batches)  # every rank trains the same model (same seed, same data)
    model.eval()
    model.zero_grad(set_to_none=True)
    params = dict(model.named_parameters())
    loss = nn.CrossEntropyLoss()
    H = fc.HessianOperator(
        model, loss, params, batches[rank::world]
    )  # this rank's shard
    say(
        f"model: {sum(p.numel() for p in params.values())} parameters, N = "
        f"{H.num_data} samples, {world} process(es)"
    )

    evals, evecs = fc.eigsh(H, k=3, which="LA", tol=1e-8, seed=0)
    residual = torch.linalg.vector_norm(H @ evecs - evecs * evals, dim=0).max()
    say(
        f"top-3 eigenvalues: {[round(float(e), 6) for e in evals]}  (max residual "
        f"{float(residual):.1e})"
    )
    assert residual < 1e-5 * float(evals.abs().max())

    bottom, _ = fc.eigsh(H, k=1, which="SA", tol=1e-8, seed=0)
    say(
        f"smallest eigenvalue: {float(bottom[0]):.6f}  (negative: the Hessian is "
        "indefinite here)"
    )

    trace = fc.trace(H, num_matvecs=200, method="hutch++", seed=0)
    say(f"trace (Hutch++, 200 products): {float(trace):.5f}")

    layer = {k: params[k] for k in ("0.weight", "0.bias")}
    exact = (
        fc.HessianOperator(model, loss, layer, batches[rank::world])
        .to_dense()
        .diagonal()
    )
    estimate = fc.diagonal(H, num_matvecs=200, method="xdiag", seed=0, as_tree=True)
    first = torch.cat([estimate["0.weight"].reshape(-1), estimate["0.bias"]])
    error = torch.linalg.vector_norm(first - exact) / torch.linalg.vector_norm(exact)
    say(
        "diagonal of the first conv layer (XDiag, 200 products): relative error "
        f"{float(error):.3f} vs exact"
    )
    assert error < 0.5

    grid, density = fc.spectral_density(H, num_probes=4, num_steps=40, seed=0)
    mass = float(torch.trapezoid(density, grid))
    say(
        f"spectral density on [{float(grid[0]):.3f}, {float(grid[-1]):.3f}], mass "
        f"{mass:.3f}"
    )
    assert abs(mass - 1) < 0.05

    if rank == 0:
        plot(grid, density, evals, args.plot)
    say(f"done in {time.perf_counter() - start:.1f} s")
    if world > 1:
        torch.distributed.destroy_process_group()


def plot(
    grid: torch.Tensor, density: torch.Tensor, evals: torch.Tensor, path: str
) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install functx[plot])")
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.semilogy(grid.numpy(), density.clamp_min(1e-12).numpy())
    for e in evals:
        ax.axvline(float(e), color="tab:red", lw=0.8, ls="--")
    ax.set(
        xlabel="eigenvalue",
        ylabel="density",
        title="Hessian spectral density (SLQ)",
        ylim=(1e-6, None),
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


if __name__ == "__main__":
    main()
