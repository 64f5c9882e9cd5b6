"""Shared timing for the benchmark scripts: interleaved medians and markdown tables.

Candidates are timed round-robin (one call of each per round) so that load on a shared
machine hits all of them alike; we report medians and ratios, never single timings.
As in ``timeit``, the garbage collector is off inside a round and runs, untimed, between
rounds (whose order rotates): torch.func leaves ~100 cyclic objects per Jacobian call, and
periodic collections otherwise land on whichever candidate crosses the threshold.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch


def compare(candidates: dict[str, Callable[[], object]], *, rounds: int = 30, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each candidate, measured interleaved."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    order = list(candidates.items())
    enabled = gc.isenabled()
    try:
        for k in range(rounds):
            gc.collect()
            gc.disable()
            for name, fn in order[k % len(order):] + order[: k % len(order)]:  # rotate who goes first
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
            gc.enable()
    finally:
        if enabled:
            gc.enable()
    return {name: statistics.median(times) for name, times in samples.items()}


def fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-6:.3g} us"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def setup_threads() -> str:
    """Pin the thread count so runs are comparable; returns a description for the report."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads"
