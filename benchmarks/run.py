"""Run every benchmark script in this folder (`make bench`); pass `--quick` for a smoke run."""

import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).parent


def main() -> int:
    failures = 0
    for script in sorted(HERE.glob("bench_*.py")):
        print(f"\n## {script.stem}\n", flush=True)
        failures += subprocess.run([sys.executable, str(script), *sys.argv[1:]]).returncode != 0
    return failures


if __name__ == "__main__":
    sys.exit(main())
