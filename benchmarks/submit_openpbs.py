"""Submit-to-COMPLETED of examples/mlp.py on the real OpenPBS testbed, against the local backend in the same run.

    RANNC_TEST_OPENPBS=/path/openpbs-bookworm.tgz python benchmarks/submit_openpbs.py [--repeats 3]

Each repeat runs `rannc submit examples/mlp.py --nodes 1 --gpus 2 --wait` three ways, timed from the
command's start to its exit with COMPLETED: PBS with the profiling job (profile job -> plan at the
training job's start -> 2 ranks through pbs_tmrsh), PBS with a ready profile (plan on the submit host,
training job only), and the local backend with the same ready profile (the baseline: no scheduler).
Prints seconds per repeat and the median ratio PBS / local. Starts and stops the testbed
(tests/testbed/openpbs.py) unless one is running.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
MLP_ARGS = ["--steps", "12", "--hidden", "32", "--layers", "2", "--lr", "0.02", "--batch-size", "128"]
FAST = {"RANNC_PROFILE_REPEATS": "1", "RANNC_PROFILE_WARMUP": "0", "RANNC_POLL_SECONDS": "0.3"}


def timed_submit(env: dict, cwd: Path, *flags: str) -> float:
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "rannc_cli.cli", "submit", str(ROOT / "examples" / "mlp.py"),
                          "--nodes", "1", "--gpus", "2", *flags, "--wait", "--", *MLP_ARGS],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    took = time.monotonic() - t0
    if res.returncode != 0 or "COMPLETED" not in res.stdout:
        raise SystemExit(f"submit {' '.join(flags)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from testbed.openpbs import OpenPBSServer

    tarball = os.environ.get("RANNC_TEST_OPENPBS")
    if not tarball:
        raise SystemExit("set RANNC_TEST_OPENPBS to the openpbs-bookworm.tgz tarball")
    t0 = time.monotonic()
    server = OpenPBSServer.start(Path(tarball))
    print(f"OpenPBS testbed ready in {time.monotonic() - t0:.1f} s")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            env = {**server.env, **FAST, "RANNC_LOGS_DIR": str(tmp / "logs"), "RANNC_CACHE_DIR": str(tmp / "cache")}
            profile = tmp / "mlp-profile.yaml"
            subprocess.run([sys.executable, "-m", "rannc_cli.cli", "profile", str(ROOT / "examples" / "mlp.py"),
                            "--out", str(profile), "--", *MLP_ARGS], cwd=tmp, env=env, check=True,
                           capture_output=True, timeout=600)
            rows = []
            for k in range(args.repeats):
                full = timed_submit(env, tmp, "--scheduler", "pbs", "--time", "10:00", "--no-cache")
                train = timed_submit(env, tmp, "--scheduler", "pbs", "--time", "10:00", "--profile", str(profile))
                local = timed_submit(env, tmp, "--scheduler", "local", "--profile", str(profile))
                rows.append((full, train, local))
                print(f"repeat {k + 1}: pbs with profile job {full:.1f} s, pbs train only {train:.1f} s, "
                      f"local {local:.1f} s", flush=True)
            med = [statistics.median(col) for col in zip(*rows)]
            print(f"median: pbs with profile job {med[0]:.1f} s, pbs train only {med[1]:.1f} s, local {med[2]:.1f} s; "
                  f"pbs train only / local {med[1] / med[2]:.2f}, with profile job / local {med[0] / med[2]:.2f}")
            load = os.getloadavg()
            print(f"load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
