"""The documentation site builds with `mkdocs build --strict`, offline, and documents every public name."""

from __future__ import annotations

import importlib
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
pytest.importorskip("mkdocstrings_handlers.python")

ROOT = pathlib.Path(__file__).resolve().parent.parent
ROOMS = ["functx", "functx.nn", "functx.implicit", "functx.solvers", "functx.autograd_functional", "functx.curvature"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)]
    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        command = ["unshare", "-n", *command]  # no network at all: the build must not fetch anything
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return out


def test_site_builds_strictly_offline(site):
    assert (site / "index.html").exists()


@pytest.mark.parametrize("room", ROOMS)
def test_api_reference_documents_every_public_name(site, room):
    module = importlib.import_module(room)
    page = site / "api" / (room.removeprefix("functx.") if room != "functx" else "functx") / "index.html"
    ids = set(re.findall(r'id="([^"]+)"', page.read_text()))
    public = [name for name in module.__all__ if not _is_module(getattr(module, name))]
    missing = [name for name in public if f"{room}.{name}" not in ids]
    assert not missing, f"{room}: public names without an API entry (a docstring is needed): {missing}"


def _is_module(obj: object) -> bool:
    return type(obj).__name__ == "module"


def test_readme_links_point_to_files():
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    missing = [t for t in targets if "://" not in t and not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"
