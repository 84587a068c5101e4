"""The local backend's stand-in for a batch system: run one phase's job script.

    python -m rannc_cli.scheduler.local_exec --phase-dir D [--after-dir DEP] [--time S --signal-seconds W] -- bash script.sh

Waits for the dependency's rannc-exitcode (a failed or cancelled dependency cancels this phase),
runs the script in this process group, sends SIGUSR1 ``W`` seconds before the time limit
(noting it in rannc-time-warned) and SIGTERM at it (rannc-timeout), forwards SIGTERM/SIGUSR1 it
receives, and writes rannc-exitcode when the script did not. The local backend reads these files:
a phase cut at the limit, or one that checkpointed after the warning and exited 0, is TIMEOUT.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

from rannc_cli.fileio import write_text_atomic
from rannc_cli.scheduler.backend import CANCELLED_BY_USER, EXITCODE

TIME_WARNED = "rannc-time-warned"  # SIGUSR1 went out because the time limit is near
TIMED_OUT = "rannc-timeout"        # SIGTERM went out at the time limit


def _write_exit(phase_dir: Path, code: int) -> None:
    write_text_atomic(phase_dir / EXITCODE, f"{code}\n")


def _wait_dependency(dep: Path) -> int:
    while True:
        path = dep / EXITCODE
        if path.exists():
            try:
                return int(path.read_text().split()[0])
            except (ValueError, IndexError):
                return 1
        pid_text = (dep / "rannc-pid").read_text().strip() if (dep / "rannc-pid").exists() else ""
        if pid_text and not Path(f"/proc/{pid_text}").exists() and not path.exists():
            time.sleep(0.5)
            return 0 if path.exists() and path.read_text().split()[0] == "0" else 1
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rannc-local-exec")
    parser.add_argument("--phase-dir", required=True)
    parser.add_argument("--after-dir")
    parser.add_argument("--time", type=int)
    parser.add_argument("--signal-seconds", type=int, default=120)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    phase_dir = Path(args.phase_dir)
    child: subprocess.Popen | None = None
    stopping = {"term": False}

    def forward(signum, _frame):
        if signum == signal.SIGTERM:
            stopping["term"] = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)
        elif signum == signal.SIGTERM:
            (phase_dir / CANCELLED_BY_USER).touch()
            _write_exit(phase_dir, 143)
            sys.exit(143)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGUSR1, forward)
    if args.after_dir:
        dep_code = _wait_dependency(Path(args.after_dir))
        if dep_code != 0:
            print(f"rannc: dependency {args.after_dir} ended with exit code {dep_code}; not running", flush=True)
            (phase_dir / CANCELLED_BY_USER).write_text("dependency failed\n")
            _write_exit(phase_dir, 1)
            return 1
    (phase_dir / "rannc-started").touch()
    child = subprocess.Popen(command)
    start = time.monotonic()
    warned = timed_out = False
    while child.poll() is None:
        if args.time:
            elapsed = time.monotonic() - start
            if not warned and elapsed >= args.time - args.signal_seconds:
                warned = True
                (phase_dir / TIME_WARNED).touch()
                print("rannc: time-limit warning, sending SIGUSR1", flush=True)
                child.send_signal(signal.SIGUSR1)
            if not timed_out and elapsed >= args.time:
                timed_out = True
                (phase_dir / TIMED_OUT).touch()
                print("rannc: time limit reached, sending SIGTERM", flush=True)
                child.terminate()
        time.sleep(0.1)
    code = child.returncode if child.returncode >= 0 else 128 - child.returncode
    if stopping["term"] and not (phase_dir / CANCELLED_BY_USER).exists() and not timed_out:
        (phase_dir / CANCELLED_BY_USER).touch()
    if not (phase_dir / EXITCODE).exists():
        _write_exit(phase_dir, code)
    return code


if __name__ == "__main__":
    sys.exit(main())
