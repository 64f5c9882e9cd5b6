"""Every script in examples/ runs to completion (they assert their own results).

A script that takes ``--plot PATH`` is run with it: it saves its figure when matplotlib is
installed, and still runs and prints (saying there is no figure) when it is not.
"""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = sorted(
    p for p in (pathlib.Path(__file__).parent.parent / "examples").glob("*.py") if not p.name.startswith("_")
)
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
# scripts that need an optional extra: `make test` installs it (`examples` extra); the
# oldest-versions venv of `make test-min` does not, and skips them
OPTIONAL = {"sklearn": "scikit-learn (the `examples` extra)"}


def _run(args: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script, tmp_path):
    text = script.read_text()
    for module, what in OPTIONAL.items():
        if f"from {module}" in text or f"import {module}" in text:
            if importlib.util.find_spec(module) is None:
                pytest.skip(f"{script.name} needs {what}")
    plots = "--plot" in text
    figure = tmp_path / f"{script.stem}.png"
    result = _run([str(script), *(["--plot", str(figure)] if plots else [])], tmp_path)
    assert result.returncode == 0, f"{script.name} failed:\n{result.stdout}\n{result.stderr}"
    assert result.stdout.strip(), f"{script.name} printed nothing"
    if plots and HAS_MATPLOTLIB:
        assert figure.stat().st_size > 1000, f"{script.name} saved no figure"


def test_plotting_example_runs_without_matplotlib(tmp_path):
    script = pathlib.Path(__file__).parent.parent / "examples" / "hessian_eigenvalue.py"
    blocked = "import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    result = _run(["-c", blocked, str(script), "--plot", str(tmp_path / "x.png")], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "matplotlib is not installed" in result.stdout
    assert not (tmp_path / "x.png").exists()
