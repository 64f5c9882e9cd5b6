"""functx.autograd_functional against torch.autograd.functional, side by side in one run.

Usage::

    python benchmarks/bench_autograd_functional.py            # full run, about a minute
    python benchmarks/bench_autograd_functional.py --quick    # a few seconds, smoke test

Prints a markdown table of median times and speedups (original / functx, the median of
the per-round ratios). Each case runs its candidates round-robin, ``--repeats`` times, so
that load on a shared machine hits them alike; compare the ratios, not the absolute times. One intra-op thread by default
(``--threads``) for steadier ratios on small machines.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable

import torch
import torch.autograd.functional as TAF

import functx.autograd_functional as AF

sys.path.insert(0, os.path.dirname(__file__))
from _timing import samples


def speedup(per_round: dict[str, list[float]], name: str, than: str = "functx") -> float:
    """Median over rounds of ``name``'s time / ``than``'s time in the same round (paired
    ratios cancel the load drifts of a shared machine)."""
    return statistics.median(a / b for a, b in zip(per_round[name], per_round[than]))


def dense_problem(n: int) -> tuple[Callable, Callable, torch.Tensor]:
    gen = torch.Generator().manual_seed(n)
    W = torch.randn(n, n, generator=gen) / n**0.5
    x = torch.randn(n, generator=gen)
    vector = lambda x: torch.tanh(W @ x) + x.sin() * x.sum()  # R^n -> R^n
    scalar = lambda x: (torch.tanh(W @ x) ** 2).sum() + (x**4).sum()  # R^n -> R
    return vector, scalar, x


def mlp_problem(batch: int = 64) -> tuple[Callable, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Cross-entropy of a 256-512-512-10 tanh MLP: 399,370 parameters."""
    gen = torch.Generator().manual_seed(0)
    sizes = [(256, 512), (512, 512), (512, 10)]
    params = tuple(p for i, o in sizes for p in (torch.randn(o, i, generator=gen) / i**0.5, torch.zeros(o)))
    X, y = torch.randn(batch, 256, generator=gen), torch.randint(0, 10, (batch,), generator=gen)

    def loss(*ps: torch.Tensor) -> torch.Tensor:
        h = X
        for k in range(3):
            h = h @ ps[2 * k].T + ps[2 * k + 1]
            h = torch.tanh(h) if k < 2 else h
        return torch.nn.functional.cross_entropy(h, y)

    v = tuple(torch.randn(p.shape, generator=gen) for p in params)
    return loss, params, v


def dense_cases(n: int) -> list[tuple[str, str, dict[str, Callable[[], object]]]]:
    vector, scalar, x = dense_problem(n)
    jacobians = {
        "original": lambda: TAF.jacobian(vector, x),
        "functx": lambda: AF.jacobian(vector, x),
        "original vectorize=True": lambda: TAF.jacobian(vector, x, vectorize=True),
    }
    hessians = {
        "original": lambda: TAF.hessian(scalar, x),
        "functx": lambda: AF.hessian(scalar, x),
        "original vectorize=True": lambda: TAF.hessian(scalar, x, vectorize=True),
    }
    return [
        (f"jacobian R^{n}->R^{n}", ">= 10x at n=256" if n == 256 else "", jacobians),
        (f"hessian R^{n}->R", ">= 5x at n=256" if n == 256 else "", hessians),
    ]


def cases() -> list[tuple[str, str, dict[str, Callable[[], object]]]]:
    """(name, target, {"original": ..., "functx": ..., extra originals...})."""
    out = []
    for n in (64, 256):
        out += dense_cases(n)
    loss, params, v = mlp_problem()
    out.append(
        (
            "hvp, MLP 399k params",
            "faster than original vhp",
            {
                "original": lambda: TAF.vhp(loss, params, v),
                "functx": lambda: AF.hvp(loss, params, v),
                "original hvp": lambda: TAF.hvp(loss, params, v),
            },
        )
    )
    out.append(
        (
            "jvp, MLP 399k params",
            "",
            {
                "original": lambda: TAF.jvp(loss, params, v),
                "functx": lambda: AF.jvp(loss, params, v),
            },
        )
    )
    small = torch.randn(8)
    f, g = (lambda x: (x.sin() * x).exp()), (lambda x: (x.sin() * x).exp().sum())
    for api, fn in (("vjp", f), ("jvp", f), ("vhp", g), ("hvp", g)):
        out.append(
            (
                f"{api}, small (R^8)",
                "<= 1.10x slower" if api != "hvp" else "",
                {
                    "original": lambda api=api, fn=fn: getattr(TAF, api)(fn, small, small),
                    "functx": lambda api=api, fn=fn: getattr(AF, api)(fn, small, small),
                    # the original again: its ratio to the original shows this run's noise
                    "noise": lambda api=api, fn=fn: getattr(TAF, api)(fn, small, small),
                },
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, short timings")
    parser.add_argument("--repeats", type=int, default=None, help="round-robin repeats (default 21, quick 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 21)
    min_time = 0.005 if args.quick else 0.02
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {repeats} round-robin repeats\n")
    print("| case | torch.autograd.functional | functx.autograd_functional | speedup | target | other |")
    print("|---|---:|---:|---:|---|---|")
    for name, target, candidates in cases():
        per_round = samples(candidates, rounds=repeats, warmup=1, block=min_time)
        t = {k: statistics.median(v) * 1e3 for k, v in per_round.items()}
        notes = [
            f"{k}: {t[k]:.3g} ms ({speedup(per_round, k):.2f}x)" for k in t if k not in ("original", "functx", "noise")
        ]
        if "noise" in per_round:
            notes.append(f"noise: the original twice, ratio {speedup(per_round, 'noise', 'original'):.2f}")
        other = ", ".join(notes)
        print(
            f"| {name} | {t['original']:.3g} ms | {t['functx']:.3g} ms | "
            f"{speedup(per_round, 'original'):.2f}x | {target} | {other} |"
        )


if __name__ == "__main__":
    main()
