"""functx.curvature over torch.distributed (gloo on CPU), with 2 and 3 processes.

Each world size starts its processes once (tests/_dist_worker.py, one rank each, joined through a
TCPStore this process holds on a free port) and every check runs in that one start-up; each test
below then asserts that its check passed on every rank. A hang fails: the collectives time out
after 30 s and the whole world is killed after ``WORLD_TIMEOUT`` seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from functx._curvature import _distributed as D

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")

HERE = Path(__file__).parent
WORKER = HERE / "_dist_worker.py"
WORLD_TIMEOUT = 120  # seconds for a whole world: start-up of every rank plus every check
API = "functx.curvature.HessianOperator"


def _check_names() -> list[str]:
    sys.path.insert(0, str(HERE))
    try:
        import _dist_worker

        return list(_dist_worker.CHECKS)
    finally:
        sys.path.remove(str(HERE))


CHECK_NAMES = _check_names()


def run_world(world: int) -> dict[str, list[str | None]]:
    """Run every check on ``world`` ranks; check name -> per-rank error (None when it passed)."""
    store = dist.TCPStore("127.0.0.1", 0, world + 1, True, timeout=timedelta(seconds=60), wait_for_workers=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as out:
        procs = [
            subprocess.Popen(
                [sys.executable, str(WORKER), str(store.port), str(rank), str(world), out],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for rank in range(world)
        ]
        outputs = _wait_all(procs)
        results: dict[str, list[str | None]] = {name: ["rank did not report"] * world for name in CHECK_NAMES}
        for rank in range(world):
            path = Path(out) / f"rank{rank}.jsonl"
            for line in path.read_text().splitlines() if path.exists() else []:
                record = json.loads(line)
                results[record["check"]][rank] = record["error"]
    for rank, (code, text) in enumerate(outputs):
        if code != 0:
            for errors in results.values():
                errors[rank] = errors[rank] or f"rank {rank} exited with {code}:\n{text}"
    return results


def _wait_all(procs: list[subprocess.Popen]) -> list[tuple[int | None, str]]:
    """Wait for every rank; past the deadline kill them all (a hang fails instead of blocking CI)."""
    outputs = []
    try:
        for proc in procs:
            text, _ = proc.communicate(timeout=WORLD_TIMEOUT)
            outputs.append((proc.returncode, text))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        outputs = [(None, "killed after timeout: " + (proc.communicate()[0] or "")) for proc in procs]
    return outputs


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def world(request):
    return run_world(request.param)


@pytest.mark.parametrize("check", CHECK_NAMES)
def test_distributed(world, check):
    errors = world[check]
    failed = {rank: error for rank, error in enumerate(errors) if error is not None}
    assert not failed, "\n".join(f"--- rank {rank}:\n{error}" for rank, error in failed.items())


# ------------------------------------------------------------------ one process, torch.distributed not initialised
def test_not_initialised_is_one_process():
    assert not dist.is_initialized()
    group = D.resolve_group(None, API)
    assert group is None
    v = torch.arange(3.0, dtype=torch.float64)
    assert D.all_reduce_sum(v, group) is v
    assert D.global_count(7, group) == 7
    assert D.any_rank(True, group) is True and D.any_rank(False, group) is False
    assert D.flagged_ranks(True, group) == [0] and D.flagged_ranks(False, group) == []
    D.check_same_across_ranks([("w", (2,), torch.float64)], group, API)


def test_group_without_init_is_a_value_error():
    with pytest.raises(
        ValueError, match=r"^`functx.curvature.HessianOperator`: `group` was given but torch.distributed"
    ):
        D.resolve_group(object(), API)


@pytest.mark.parametrize(
    ("backend", "device", "expected"),
    [
        ("gloo", "cpu", "cpu"),
        ("gloo", "cuda:1", "cpu"),  # gloo: CUDA tensors go through host memory
        ("cpu:gloo,cuda:nccl", "cpu", "cpu"),
        ("mpi", "cpu", "cpu"),  # other backends: the tensor's own device
        ("ucc", "cuda:0", "cuda:0"),
    ],
)
def test_reduce_device_by_backend(monkeypatch, backend, device, expected):
    monkeypatch.setattr(dist, "get_backend", lambda group: backend)
    assert D._reduce_device(torch.device(device), object()) == torch.device(expected)


@pytest.mark.parametrize("device", ["cpu", "cuda:0", "cuda:1"])
def test_nccl_reduces_on_the_bound_or_current_device(monkeypatch, device):
    monkeypatch.setattr(dist, "get_backend", lambda group: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert D._reduce_device(torch.device(device), object()) == torch.device("cuda", 1)
    bound = type("Group", (), {"bound_device_id": torch.device("cuda", 3)})()
    assert D._reduce_device(torch.device(device), bound) == torch.device("cuda", 3)


def test_digest_sees_bits_shape_and_dtype():
    v = torch.linspace(-1, 1, 12, dtype=torch.float64)
    assert D._digest(v) == D._digest(v.clone())
    for other in (v.flip(0), v.reshape(3, 4), v.float(), (v.view(torch.int64) ^ 1).view(torch.float64)):
        assert D._digest(other) != D._digest(v)
    assert 0 <= D._digest(v) < 2**20
