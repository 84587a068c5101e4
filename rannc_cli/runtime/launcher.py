"""`rannc run`: start N local worker processes running the same training script.

    code = run_local("train.py", ["--lr", "0.1"], nproc=4, stages=2, replicas=[2, 2], microbatches=4)

Each worker gets torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), the plan constraints as RANNC_* settings, and one thread on CPU-only
machines (OMP_NUM_THREADS=1 unless set); with GPUs each worker uses the GPU of its local rank.
Rank 0's output passes through unchanged, other ranks' lines are prefixed ``[rank R]``; with
``log_dir`` every rank's stdout and stderr also go to ``log_dir/rank-<R>.log`` (appended) and only
rank 0's output reaches the terminal. SIGUSR1 (checkpoint now, see rannc_cli/runtime/preempt.py)
and SIGTERM sent to the launcher are forwarded to every worker. When a
worker exits non-zero the others get two seconds to report, then are stopped; the exit code is
that of the worker that failed first (a worker that only lost contact with a failed peer exits
3 and counts only when no other worker failed), 0 when all succeed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from rannc_cli.errors import RanncError

PEER_LOST = 3


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pump(stream: IO[bytes], out: IO[str] | None, prefix: str, lock: threading.Lock, log: IO[bytes] | None = None) -> None:
    for raw in iter(stream.readline, b""):
        with lock:
            if log is not None:
                log.write(raw)
                log.flush()
            if out is not None:
                line = raw.decode(errors="replace")
                out.write(prefix + line if prefix else line)
                out.flush()
    stream.close()


def run_local(script: str | Path, script_args: list[str], nproc: int, stages: int | None = None,
              replicas: list[int] | None = None, microbatches: int | None = None, schedule: str | None = None,
              plan: str | Path | None = None, checkpoint: str | None = None, grace: float = 2.0,
              log_dir: str | Path | None = None) -> int:
    """Run ``script`` in ``nproc`` processes; return the exit code (see the module docstring)."""
    script = Path(script)
    if not script.is_file():
        raise RanncError(f"script {script} does not exist", hint="pass the path of your training script")
    if nproc < 1:
        raise RanncError(f"--nproc must be at least 1 (got {nproc})")
    if schedule is not None and schedule not in ("1f1b", "gpipe"):
        raise RanncError(f"--schedule {schedule!r} is not known", hint="use 1f1b or gpipe")
    if replicas is not None:
        if stages is not None and stages != len(replicas):
            raise RanncError(f"--stages {stages} but --replicas names {len(replicas)} stages",
                             hint="give one replica count per stage")
        if sum(replicas) > nproc:
            raise RanncError(f"--replicas {','.join(map(str, replicas))} needs {sum(replicas)} processes, "
                             f"--nproc is {nproc}", hint="raise --nproc or lower the replica counts")
    if stages is not None and not 1 <= stages <= nproc:
        raise RanncError(f"--stages {stages} must be between 1 and --nproc ({nproc})")
    if plan is not None and not Path(plan).is_file():
        raise RanncError(f"plan file {plan} does not exist", hint="create one with `rannc plan --out FILE`")

    base = dict(os.environ)
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nproc),
                LOCAL_WORLD_SIZE=str(nproc), PYTHONUNBUFFERED="1")
    base.setdefault("OMP_NUM_THREADS", "1")
    for key, value in (("RANNC_STAGES", stages), ("RANNC_MICROBATCHES", microbatches),
                       ("RANNC_SCHEDULE", schedule), ("RANNC_PLAN", plan), ("RANNC_CHECKPOINT", checkpoint),
                       ("RANNC_REPLICAS", ",".join(map(str, replicas)) if replicas else None)):
        if value is not None:
            base[key] = str(Path(value).resolve()) if key == "RANNC_PLAN" else str(value)

    logs: list[IO[bytes]] = []
    if log_dir is not None:
        log_dir = Path(log_dir)
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            logs = [open(log_dir / f"rank-{rank}.log", "ab") for rank in range(nproc)]
        except OSError as exc:
            raise RanncError(f"cannot write rank logs in {log_dir} ({exc.strerror})",
                             hint="pass a writable --log-dir") from None

    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []

    def forward(signum, _frame):  # type: ignore[no-untyped-def]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {}
    # Workers start with SIGUSR1 ignored (an ignored signal stays ignored across exec) until the runtime
    # installs its checkpoint handler: a warning that comes while a worker still imports torch is then
    # dropped instead of killing it (job scripts repeat the warning until the ranks stop).
    for sig, action in ((signal.SIGUSR1, signal.SIG_IGN), (signal.SIGTERM, forward)):
        try:
            previous[sig] = signal.signal(sig, action)
        except ValueError:  # not the main thread
            pass
    for rank in range(nproc):
        env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
        if logs and rank > 0:  # straight into its log, not to the terminal
            proc = subprocess.Popen([sys.executable, "-u", str(script), *script_args], env=env,
                                    stdin=subprocess.DEVNULL, stdout=logs[rank], stderr=subprocess.STDOUT)
            procs.append(proc)
            continue
        proc = subprocess.Popen([sys.executable, "-u", str(script), *script_args], env=env,
                                stdin=subprocess.DEVNULL if logs else None,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs.append(proc)
        prefix = "" if rank == 0 else f"[rank {rank}] "
        for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
            t = threading.Thread(target=_pump, args=(stream, out, prefix, lock, logs[rank] if logs else None),
                                 daemon=True)
            t.start()
            pumps.append(t)

    if signal.SIGUSR1 in previous:
        signal.signal(signal.SIGUSR1, forward)
    failures: list[tuple[int, int]] = []  # (rank, code) in the order they were seen
    stopped: set[int] = set()
    deadline = None
    try:
        while True:
            running = False
            for rank, proc in enumerate(procs):
                code = proc.poll()
                if code is None:
                    running = True
                elif code != 0 and rank not in stopped and all(r != rank for r, _ in failures):
                    failures.append((rank, code))
            if not running:
                break
            if failures and deadline is None:
                deadline = time.monotonic() + grace
            if deadline is not None and time.monotonic() > deadline:
                for rank, proc in enumerate(procs):
                    if proc.poll() is None:
                        stopped.add(rank)
                        proc.terminate()
                _reap(procs, 5.0)
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        _reap(procs, 5.0)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for t in pumps:
        t.join(timeout=2.0)
    for log in logs:
        log.close()
    if not failures:
        return 0
    origin = next(((r, c) for r, c in failures if c != PEER_LOST), failures[0])
    rank, code = origin
    code = 128 - code if code < 0 else code
    others = [r for r, _ in failures if r != rank] + sorted(stopped)
    tail = f"; stopped or lost ranks {', '.join(map(str, sorted(set(others))))}" if others else ""
    where = f" (see {Path(log_dir) / f'rank-{rank}.log'})" if log_dir is not None else ""
    print(f"rannc run: rank {rank} failed first (exit code {code}){where}{tail}", file=sys.stderr, flush=True)
    return code


def _reap(procs: list[subprocess.Popen], timeout: float) -> None:
    end = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
