"""Rerun the cookbook scripts and store what the site shows beside their code (`make cookbook`).

For each examples/NAME.py: its printed output goes to docs/cookbook/_output/NAME.txt and, for a
script that takes ``--plot PATH``, its figure to docs/img/NAME.png. The cookbook pages include
the script itself and that output with ``--8<--`` (pymdownx.snippets), so the code on the site
is always the tested script. Run from the repository root.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main() -> int:
    out_dir, img_dir = ROOT / "docs" / "cookbook" / "_output", ROOT / "docs" / "img"
    out_dir.mkdir(parents=True, exist_ok=True)
    img_dir.mkdir(exist_ok=True)
    names = sys.argv[1:] or [p.stem for p in sorted((ROOT / "examples").glob("*.py")) if not p.name.startswith("_")]
    failures = 0
    for name in names:
        script = ROOT / "examples" / f"{name}.py"
        args = [sys.executable, str(script)]
        if "--plot" in script.read_text():
            args += ["--plot", str(img_dir / f"{name}.png")]
        print(f"running {script.relative_to(ROOT)}", flush=True)
        result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
        if result.returncode != 0:
            print(result.stdout + result.stderr)
            failures += 1
            continue
        lines = [line for line in result.stdout.splitlines() if not line.startswith("figure saved to")]
        (out_dir / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return failures


if __name__ == "__main__":
    sys.exit(main())
