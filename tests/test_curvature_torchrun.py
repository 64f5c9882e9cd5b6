"""examples/hessian_spectrum.py under `torchrun --nproc_per_node=2` prints the same numbers as
one process (issue: the same script on one process or many)."""

import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "hessian_spectrum.py"
VARYING = ("model:", "done in", "plot written", "matplotlib")  # process count, time, where the plot went


def _numbers(command: list[str]) -> list[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return [line for line in result.stdout.splitlines() if line.strip() and not line.startswith(VARYING)]


@pytest.mark.skipif(sys.platform != "linux", reason="gloo over localhost, as in CI")
def test_example_under_torchrun_prints_the_single_process_numbers():
    single = _numbers([sys.executable, str(EXAMPLE)])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    distributed = _numbers([*launcher, str(EXAMPLE)])
    assert any("top-3 eigenvalues" in line for line in single), single
    assert distributed == single
