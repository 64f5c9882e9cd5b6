"""Rerun the cookbook scripts and store what the site shows beside their code (`make cookbook`).

For each examples/NAME.py: its printed output goes to docs/cookbook/_output/NAME.txt and, for a
script that takes ``--plot PATH``, its figure to docs/img/NAME.png. The cookbook pages include
the script itself and that output with ``--8<--`` (pymdownx.snippets), so the code on the site
is always the tested script. Run from the repository root.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Lines that name this machine's paths or timings: left out of the stored output.
_MACHINE_SPECIFIC = re.compile(r"^(figure saved to|plot written to|done in [0-9.]+ s$)")


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
        lines = [line for line in result.stdout.splitlines() if not _MACHINE_SPECIFIC.match(line)]
        (out_dir / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return failures


if __name__ == "__main__":
    sys.exit(main())
