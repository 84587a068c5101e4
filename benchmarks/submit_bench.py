"""Submit-to-COMPLETED per batch system: Grid Engine vs Slurm testbeds, measured side by side in one run.

    python benchmarks/submit_bench.py              # as root: starts both testbeds (tests/testbed/), 3 rounds
    python benchmarks/submit_bench.py --rounds 5 --json out.json

Each round runs, on each testbed in turn, ``rannc submit examples/mlp.py --nodes 1 --gpus 2 --wait``
twice: with ``--profile`` (a profile made once here: the training job only) and without (the whole
flow: profiling job -> dependent training job, plan at its start). The figure is the wall time from
the command's start to its exit with COMPLETED; reported as medians over rounds and as the ratio
Grid Engine / Slurm (the baseline measured in the same run). It prints ``uptime`` before and after:
the machine is shared, so the load goes with the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from testbed.gridengine import GridEngine  # noqa: E402
from testbed.scheduler import FAST, MLP_ARGS, make_profile  # noqa: E402
from testbed.slurm import SlurmCluster  # noqa: E402


def submit_seconds(env: dict[str, str], scheduler: str, work: Path, profile: Path | None) -> float:
    argv = [sys.executable, "-m", "rannc_cli.cli", "submit", str(ROOT / "examples" / "mlp.py"), "--scheduler",
            scheduler, "--nodes", "1", "--gpus", "2", "--time", "10:00", "--wait", "--no-cache"]
    argv += ["--profile", str(profile)] if profile else []
    t0 = time.monotonic()
    res = subprocess.run([*argv, "--", *MLP_ARGS], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    took = time.monotonic() - t0
    if res.returncode != 0 or "COMPLETED" not in res.stdout:
        raise SystemExit(f"{scheduler}: submit failed:\n{res.stdout}\n{res.stderr}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    base = Path(tempfile.mkdtemp(prefix="rannc-submit-bench-"))
    t0 = time.monotonic()
    ge = GridEngine.start(base / "gridengine")
    ge_start = time.monotonic() - t0
    t0 = time.monotonic()
    slurm = SlurmCluster.start(base / "slurm")
    slurm_start = time.monotonic() - t0
    try:
        profile = make_profile(base)
        times: dict[str, list[float]] = {}
        for r in range(args.rounds):
            for name, scheduler, cluster in (("gridengine", "sge", ge), ("slurm", "slurm", slurm)):
                for flow, prof in (("train", profile), ("full", None)):
                    work = base / f"{name}-{flow}-{r}"
                    work.mkdir()
                    env = {**cluster.env, **FAST, "RANNC_LOGS_DIR": str(work / "logs"),
                           "RANNC_CACHE_DIR": str(work / "cache")}
                    took = submit_seconds(env, scheduler, work, prof)
                    times.setdefault(f"{name}/{flow}", []).append(took)
                    print(f"round {r}: {name:10s} {flow:5s} {took:6.1f} s", flush=True)
    finally:
        ge.stop()
        slurm.stop()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"testbed start: gridengine {ge_start:.1f} s, slurm {slurm_start:.1f} s")
    for flow in ("train", "full"):
        g, s = med[f"gridengine/{flow}"], med[f"slurm/{flow}"]
        print(f"{flow:5s}: gridengine {g:.1f} s, slurm {s:.1f} s, ratio {g / s:.2f}")
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    if args.json:
        args.json.write_text(json.dumps({"times": times, "medians": med, "start": {"gridengine": ge_start,
                                                                                  "slurm": slurm_start}}, indent=2))


if __name__ == "__main__":
    main()
