"""Shared timing for the benchmark scripts: interleaved medians and markdown tables.

Each candidate is timed in blocks of back-to-back calls (about ``block`` seconds each, the
call count calibrated once, as ``timeit.autorange`` does), and the blocks of all candidates
are interleaved round-robin, with the order rotating every round, so that load on a shared
machine hits all of them alike. We report the median per-call time over rounds, and ratios,
never single timings. As in ``timeit``, the garbage collector is off inside a block and runs,
untimed, between blocks: torch.func leaves ~100 cyclic objects per Jacobian call, and
collections would otherwise land on whichever candidate crosses the threshold.

On a shared machine, ``clock="thread"`` (``--cpu-clock`` in the scripts) measures the CPU
time of the calling thread (``time.thread_time``) instead of wall time: the time the
process waits for a core is not counted. It is meaningful for one-thread runs only
(``OMP_NUM_THREADS=1``), where all the work happens on the calling thread.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import torch

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "thread": time.thread_time}
_clock: Callable[[], float] = time.perf_counter


def set_clock(name: str) -> None:
    """Time with ``"wall"`` (``time.perf_counter``, the default) or ``"thread"`` CPU time."""
    global _clock
    _clock = CLOCKS[name]


def compare(
    candidates: dict[str, Callable[[], object]], *, rounds: int = 15, warmup: int = 3, block: float = 0.02
) -> dict[str, float]:
    """Median seconds per call of each candidate, measured in interleaved blocks."""
    per_round = samples(candidates, rounds=rounds, warmup=warmup, block=block)
    return {name: statistics.median(times) for name, times in per_round.items()}


def samples(
    candidates: dict[str, Callable[[], object]], *, rounds: int = 15, warmup: int = 3, block: float = 0.02
) -> dict[str, list[float]]:
    """Seconds per call of each candidate in each round (for paired per-round ratios)."""
    numbers = {name: _calibrate(fn, warmup, block) for name, fn in candidates.items()}
    times: dict[str, list[float]] = {name: [] for name in candidates}
    order = list(candidates.items())
    enabled = gc.isenabled()
    try:
        for k in range(rounds):
            for name, fn in order[k % len(order) :] + order[: k % len(order)]:  # rotate who goes first
                gc.collect()
                gc.disable()
                start = _clock()
                for _ in range(numbers[name]):
                    fn()
                times[name].append((_clock() - start) / numbers[name])
                gc.enable()
    finally:
        if enabled:
            gc.enable()
    return times


def _calibrate(fn: Callable[[], object], warmup: int, block: float) -> int:
    """How many back-to-back calls of ``fn`` take about ``block`` seconds (at least 1)."""
    for _ in range(warmup):
        fn()
    start = _clock()
    fn()
    return max(1, int(block / max(_clock() - start, 1e-7)))


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
