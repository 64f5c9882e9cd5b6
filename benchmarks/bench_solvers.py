"""Side-by-side benchmark of functx.solvers: ``python benchmarks/bench_solvers.py``.

Prints two tables: accuracy at default tolerances (against JAX/JAXopt's default ``tol=1e-5``),
and time RATIOS measured in the same run (medians over repeats), never absolute times.
"""

from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _timing import compare

import functx
from functx import solvers

F64 = torch.float64


def _spd(n: int, cond: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=gen))
    return (q * torch.logspace(0, math.log10(cond), n, dtype=F64)) @ q.T


def accuracy_table(n: int = 200, cond: float = 1e3) -> list[str]:
    a = _spd(n, cond)
    b = torch.randn(n, dtype=F64, generator=torch.Generator().manual_seed(1))
    ref = torch.linalg.solve(a, b)
    rows = ["| solver | tolerance | iterations | relative error of x | converged |", "|---|---|---|---|---|"]
    for name in ["cg", "minres", "gmres", "bicgstab"]:
        for label, rtol in [("rtol=1e-5 (JAX/JAXopt default)", 1e-5), ("functx default (float64: 1e-12)", None)]:
            sol = getattr(solvers, name)(lambda x: a @ x, b, rtol=rtol)
            err = (torch.linalg.vector_norm(sol.value - ref) / torch.linalg.vector_norm(ref)).item()
            rows.append(f"| {name} | {label} | {int(sol.num_steps)} | {err:.1e} | {bool(sol.converged)} |")
    return rows


def timing_table(n: int = 1000, cond: float = 100.0, batch: int = 16) -> list[str]:
    a = _spd(n, cond)
    gen = torch.Generator().manual_seed(2)
    b = torch.randn(n, dtype=F64, generator=gen)
    bs = torch.randn(batch, n, dtype=F64, generator=gen)
    mv = lambda x: a @ x
    iters = int(solvers.cg(mv, b).num_steps)
    tree_b = {f"p{k}": piece for k, piece in enumerate(b.split(n // 4))}

    def tree_mv(x: dict) -> dict:
        out = a @ torch.cat([x[f"p{k}"] for k in range(4)])
        return {f"p{k}": piece for k, piece in enumerate(out.split(n // 4))}

    factor = solvers.factorize(mv, like=b)

    def masked(max_iter: int | None, rhs: torch.Tensor) -> torch.Tensor:
        return functx.vmap(lambda b: solvers.cg(mv, b, max_iter=max_iter).value)(rhs)

    t = compare(
        {
            "linalg.solve": lambda: torch.linalg.solve(a, b),
            "cg": lambda: solvers.cg(mv, b),
            "cg tree": lambda: solvers.cg(tree_mv, tree_b),
            "minres": lambda: solvers.minres(mv, b),
            "gmres": lambda: solvers.gmres(mv, b),
            "bicgstab": lambda: solvers.bicgstab(mv, b),
            "cg masked default": lambda: masked(None, b[None]),
            "cg masked tuned": lambda: masked(2 * iters, b[None]),
            "cg vmap batch": lambda: masked(2 * iters, bs),
            "cg loop batch": lambda: [solvers.cg(mv, x) for x in bs],
            "lu each": lambda: [solvers.lu(mv, x) for x in bs],
            "factor once": lambda: [solvers.factorize(mv, like=b)] + [factor.solve(x) for x in bs],
        }
    )
    r = lambda num, den: f"{t[num] / t[den]:.2f}"
    return [
        f"SPD n={n}, cond={cond:g}, float64, {torch.get_num_threads()} thread(s); CG converges in {iters} iterations.",
        "",
        "| comparison | time ratio |",
        "|---|---|",
        f"| cg (eager, stops at convergence) / torch.linalg.solve | {r('cg', 'linalg.solve')} |",
        f"| minres / cg | {r('minres', 'cg')} |",
        f"| gmres(restart=20) / cg | {r('gmres', 'cg')} |",
        f"| bicgstab / cg | {r('bicgstab', 'cg')} |",
        f"| cg on a 4-leaf dict / cg on one tensor | {r('cg tree', 'cg')} |",
        f"| cg masked, default max_iter={min(10 * n, 1000)} (under vmap) / eager | {r('cg masked default', 'cg')} |",
        f"| cg masked, max_iter={2 * iters} (under vmap) / eager | {r('cg masked tuned', 'cg')} |",
        f"| vmap over {batch} right-hand sides (max_iter={2 * iters}) / loop of {batch} eager cg | "
        f"{r('cg vmap batch', 'cg loop batch')} |",
        f"| factorize once + {batch} solves / {batch} x lu | {r('factor once', 'lu each')} |",
    ]


def main() -> None:
    torch.set_num_threads(1)  # a shared 2-core box: multi-threaded BLAS timings are mostly contention
    print("Accuracy at default tolerances (SPD n=200, cond=1e3, float64)\n")
    print("\n".join(accuracy_table()))
    print()
    print("\n".join(timing_table()))


if __name__ == "__main__":
    main()
