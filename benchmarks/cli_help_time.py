"""Wall time of the installed `rannc --help`, against the bare interpreter start measured in the same run.

    python benchmarks/cli_help_time.py --rounds 20

Runs are interleaved (help, bare start, help, ...) so machine load hits both alike; prints the
minimum and median of each, their ratio, and the heaviest imports `--help` does
(PYTHONPROFILEIMPORTTIME). Results: benchmarks/README.md, "CLI start".
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _wall(argv: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=True)
    return time.perf_counter() - start


def heaviest_imports(rannc: str, top: int = 8) -> list[tuple[int, str]]:
    """(cumulative microseconds, top-level module) of `rannc --help`'s slowest imports."""
    res = subprocess.run([rannc, "--help"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    rows = []
    for line in res.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[1].strip().isdigit() and not parts[2].startswith("  "):  # top level only
            rows.append((int(parts[1]), parts[2].strip()))
    return sorted(rows, reverse=True)[:top]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    rannc = str(Path(sys.executable).with_name("rannc"))
    helps, bare = [], []
    for _ in range(args.rounds):
        helps.append(_wall([rannc, "--help"]))
        bare.append(_wall([sys.executable, "-c", "pass"]))
    for name, xs in (("rannc --help", helps), ("python -c pass", bare)):
        print(f"{name:16s} min {min(xs):.3f} s  median {statistics.median(xs):.3f} s")
    print(f"ratio (median)   {statistics.median(helps) / statistics.median(bare):.2f}")
    print("heaviest imports (cumulative ms):", ", ".join(f"{m} {us / 1e3:.0f}" for us, m in heaviest_imports(rannc)))


if __name__ == "__main__":
    main()
