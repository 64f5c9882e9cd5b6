"""One ``H @ v`` over a fixed dataset with 1 and 2 gloo processes (1 thread each): speedup and
communication share.

Run: ``python benchmarks/bench_curvature_distributed.py [--worlds 1 2] [--batches 800] [--rounds 2]``
(the worlds run alternately, ``rounds`` times each, so that changes in the machine's load hit
them alike). The script starts each world itself (one subprocess per rank joined through a
TCPStore on a free port); every rank holds the batches ``k`` with ``k % world == rank`` of the same synthetic dataset (MLP
784-64(tanh)-10, CrossEntropyLoss(mean), float32, batches of 64, as in bench_curvature.py). World 1
is a plain process with ``torch.distributed`` not initialised.

Each rank times ``reps`` products, each started after a barrier (so all ranks start together) and
timed to its end (the all-reduce makes every rank end together). We report medians over the
products, the speedup over world 1, the CPU time of the slowest rank per product and the
speedup it implies (robust to other load on the machine: what the wall-clock speedup becomes
when each process has a core to itself), and the communication share: the time spent inside
``torch.distributed.all_reduce`` during the products (which includes waiting for the slowest rank)
over the product time, plus the cost of a bare all-reduce of ``P`` floats for comparison.

A rank's timings cannot use ``_timing.compare`` (its per-process call-count calibration would give
the ranks different numbers of collectives); the ranks run a fixed number of products instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _timing import fmt_time, markdown_table

IN, HIDDEN, OUT, BATCH = 784, 64, 10, 64


def dataset(num_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(BATCH, IN, generator=gen), torch.randint(0, OUT, (BATCH,), generator=gen))
        for _ in range(num_batches)
    ]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))


def hessian_operator(model: nn.Module, data: list) -> object:
    """functx's HessianOperator over this rank's shard (the world group when initialised)."""
    import functx.curvature as fc

    params = dict(model.named_parameters())
    return fc.HessianOperator(model, nn.CrossEntropyLoss(), params, data, check_deterministic=False)


class _CommTimer:
    """Accumulates the wall time spent inside ``torch.distributed.all_reduce``."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._inner = dist.all_reduce

    def __call__(self, *args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        try:
            return self._inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def rank_main(port: int, rank: int, world: int, num_batches: int, reps: int) -> dict[str, object]:
    torch.set_num_threads(1)
    distributed = world > 1
    if distributed:
        store = dist.TCPStore("127.0.0.1", port, world, False, timeout=timedelta(seconds=120))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=300))
    data = dataset(num_batches)[rank::world]
    H = hessian_operator(make_model(), data)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(1))
    barrier = dist.barrier if distributed else (lambda: None)
    timer = _CommTimer()
    if distributed:
        dist.all_reduce = timer  # type: ignore[assignment]
    for _ in range(2):  # warm-up
        barrier()
        H @ v
    times, comm, cpu = [], [], []
    for _ in range(reps):
        barrier()
        timer.seconds = 0.0
        start, start_cpu = time.perf_counter(), time.process_time()
        result = H @ v
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        comm.append(timer.seconds)
    bare = []
    if distributed:
        dist.all_reduce = timer._inner  # type: ignore[assignment]
        buffer = torch.zeros(H.shape[0])
        for _ in range(reps):
            barrier()
            start = time.perf_counter()
            dist.all_reduce(buffer)
            bare.append(time.perf_counter() - start)
        dist.destroy_process_group()
    return {
        "times": times,
        "cpu": cpu,
        "comm": comm,
        "bare": bare,
        "P": H.shape[0],
        "checksum": float(result.double().sum()),
    }


def run_world(world: int, num_batches: int, reps: int) -> list[dict[str, object]]:
    store = dist.TCPStore("127.0.0.1", 0, world + 1, True, timeout=timedelta(seconds=120), wait_for_workers=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    args = [str(store.port), str(world), str(num_batches), str(reps)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--rank", str(rank), *args], env=env, stdout=subprocess.PIPE, text=True
        )
        for rank in range(world)
    ]
    outs = [proc.communicate(timeout=900)[0] for proc in procs]
    if any(proc.returncode for proc in procs):
        raise SystemExit(f"a rank failed in world {world}")
    return [json.loads(out.strip().splitlines()[-1]) for out in outs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, default=800)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="worlds run alternately, rounds times each")
    args = parser.parse_args()
    checksums: dict[int, float] = {}
    samples: dict[int, dict[str, list[float]]] = {
        w: {"time": [], "cpu": [], "comm": [], "bare": []} for w in args.worlds
    }
    for k in range(args.rounds):  # alternate the worlds so that load changes hit them alike
        for world in args.worlds if k % 2 == 0 else args.worlds[::-1]:
            ranks = run_world(world, args.batches, args.reps)
            checksums[world] = float(ranks[0]["checksum"])
            for key, name in (("time", "times"), ("cpu", "cpu"), ("comm", "comm"), ("bare", "bare")):
                if ranks[0][name]:
                    samples[world][key] += [max(r[name][i] for r in ranks) for i in range(args.reps)]  # slowest rank
    base = {key: statistics.median(samples[args.worlds[0]][key]) for key in ("time", "cpu")}
    rows = []
    for world in args.worlds:
        median = {key: statistics.median(values) if values else 0.0 for key, values in samples[world].items()}
        rows.append(
            [
                str(world),
                fmt_time(median["time"]),
                f"{base['time'] / median['time']:.2f}x",
                fmt_time(median["cpu"]),
                f"{base['cpu'] / median['cpu']:.2f}x",
                f"{100 * median['comm'] / median['time']:.1f}%" if world > 1 else "-",
                fmt_time(median["bare"]) if world > 1 else "-",
                f"{checksums[world]:.6g}",
            ]
        )
    P = ranks[0]["P"]
    print(
        f"`H @ v` over {args.batches} batches of {BATCH} (MLP {IN}-{HIDDEN}-{OUT}, P={P}, float32), "
        f"torch {torch.__version__}, 1 thread per process, gloo, {os.cpu_count()} CPUs, "
        f"{args.rounds} rounds x {args.reps} products per world\n"
    )
    header = ["processes", "H @ v (median)", "speedup", "CPU (slowest rank)", "CPU-time speedup"]
    header += ["all_reduce share", f"bare all_reduce of {P} floats", "sum(H @ v)"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank":
        rank, port, world, num_batches, reps = map(int, sys.argv[2:7])
        print(json.dumps(rank_main(port, rank, world, num_batches, reps)))
    else:
        main()
