"""Start N training ranks on this machine with the runtime's rendezvous variables; one log per rank.

    python -m rannc_cli.scheduler.launch --nproc 4 --log-dir logs/x/train -- python train.py --lr 0.1

Each rank gets MASTER_ADDR=127.0.0.1, a free MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE (torchrun's names) on top of the environment (RANNC_PLAN and
RANNC_CHECKPOINT_DIR come from the job script), and writes stdout+stderr to rank-<R>.log. When a
rank exits non-zero the others are stopped at once (SIGTERM, SIGKILL 10 s later) and the launcher
exits with that rank's code, naming it. SIGUSR1 and SIGTERM are forwarded to every rank.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rannc-launch")
    parser.add_argument("--nproc", type=int, required=True)
    parser.add_argument("--log-dir", required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.nproc < 1:
        parser.error("give --nproc >= 1 and a command after --")
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    port = os.environ.get("MASTER_PORT") or str(free_port())
    procs: list[subprocess.Popen] = []

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGUSR1, forward)
    signal.signal(signal.SIGTERM, forward)
    for rank in range(args.nproc):
        env = {**os.environ, "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"), "MASTER_PORT": port,
               "RANK": str(rank), "WORLD_SIZE": str(args.nproc), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(args.nproc), "PYTHONUNBUFFERED": "1"}
        with open(log_dir / f"rank-{rank}.log", "ab") as log:
            procs.append(subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT))
    failed: tuple[int, int] | None = None
    while True:
        codes = [p.poll() for p in procs]
        bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
        if bad and failed is None:
            failed = bad[0]
            print(f"rannc: rank {failed[0]} exited with code {failed[1]} (see rank-{failed[0]}.log); "
                  "stopping the other ranks", file=sys.stderr, flush=True)
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(p.poll() is None for p in procs):
                time.sleep(0.05)
            for p in procs:
                if p.poll() is None:
                    p.kill()
        if all(c is not None for c in (p.poll() for p in procs)):
            break
        time.sleep(0.05)
    if failed is not None:
        code = failed[1]
        return code if code > 0 else 128 - code
    return 0


if __name__ == "__main__":
    sys.exit(main())
