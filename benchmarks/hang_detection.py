"""How long `rannc run` takes to notice a stopped (hung) or killed rank, against the configured timeout.

    python benchmarks/hang_detection.py                  # SIGSTOP with hang_timeout 5 s, 10 s, 60 s (default); SIGKILL
    python benchmarks/hang_detection.py --baseline       # also heartbeats off: only runtime_timeout (300 s) ends it

Each row starts `rannc run --nproc 2 --log-dir D examples/mlp.py` (small MLP, endless steps), waits
until rank 1 has logged a few steps, sends rank 1 the signal and measures the seconds from the
signal to the launcher's exit. The row also shows the exit code and whether the launcher's last
line names rank 1. Detection time is reported as seconds and as a ratio to the timeout that
should end the run (hang_timeout_seconds, or runtime_timeout with heartbeats off).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MLP = ROOT / "examples" / "mlp.py"
ARGS = ["--steps", "100000000", "--hidden", "32", "--layers", "2", "--batch-size", "64"]


def _child_rank(parent: int, rank: int) -> int | None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


def measure(sig: signal.Signals, hang_timeout: float | None, runtime_timeout: float | None) -> dict:
    env = dict(os.environ)
    for key, value in (("RANNC_HANG_TIMEOUT_SECONDS", hang_timeout), ("RANNC_RUNTIME_TIMEOUT", runtime_timeout)):
        env.pop(key, None)
        if value is not None:
            env[key] = str(value)
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp) / "logs"
        err = open(Path(tmp) / "err.txt", "w+")
        proc = subprocess.Popen([sys.executable, "-m", "rannc_cli.cli", "run", "--nproc", "2", "--replicas", "1,1",
                                 "--log-dir", str(logs), str(MLP), "--", *ARGS], cwd=tmp, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            while "step 5 " not in ((logs / "rank-1.log").read_text() if (logs / "rank-1.log").exists() else ""):
                if proc.poll() is not None:
                    raise SystemExit(f"training ended early: {Path(tmp, 'err.txt').read_text()[-2000:]}")
                time.sleep(0.1)
            pid = _child_rank(proc.pid, 1)
            assert pid is not None, "rank 1 not found"
            t0 = time.monotonic()
            os.kill(pid, sig)
            code = proc.wait(timeout=3600)
            seconds = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        lines = [line for line in err.read().splitlines() if line.startswith("rannc run:")]
    last = lines[-1] if lines else ""
    return {"seconds": seconds, "code": code, "names_rank_1": last.startswith("rannc run: rank 1 "), "line": last}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", action="store_true", help="also measure with heartbeats off (takes ~5 min)")
    parser.add_argument("--hang-timeouts", default="5,10,default",
                        help="comma list of hang_timeout_seconds to try with SIGSTOP (default: the setting's default)")
    parser.add_argument("--no-kill", action="store_true", help="skip the SIGKILL row")
    args = parser.parse_args()
    from rannc_cli.config import REGISTRY

    default = float(REGISTRY["hang_timeout_seconds"].default)
    rows = [("SIGSTOP", signal.SIGSTOP, None if t == "default" else float(t), None,
             default if t == "default" else float(t)) for t in args.hang_timeouts.split(",") if t]
    if not args.no_kill:
        rows.append(("SIGKILL", signal.SIGKILL, None, None, None))
    if args.baseline:
        rows.append(("SIGSTOP", signal.SIGSTOP, 0.0, None, 300.0))
    print("| signal | hang_timeout_seconds | runtime_timeout | detected after (s) | / timeout | exit | names rank 1 |")
    print("|---|---|---|---|---|---|---|")
    for name, sig, hang, runtime, bound in rows:
        got = measure(sig, hang, runtime)
        ratio = f"{got['seconds'] / bound:.2f}" if bound else "-"
        hang_text = f"{default:g} (default)" if hang is None else ("0 (off)" if hang == 0 else f"{hang:g}")
        print(f"| {name} | {hang_text} | {runtime or '300 (default)'} | {got['seconds']:.1f} | {ratio} | "
              f"{got['code']} | {'yes' if got['names_rank_1'] else 'NO: ' + got['line']} |", flush=True)


if __name__ == "__main__":
    main()
