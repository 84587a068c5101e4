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
3 and counts only when no other worker failed), 0 when all succeed. Every worker beats into a
heartbeat file (rannc_cli/runtime/heartbeat.py): a worker whose beat has not changed for
``hang_timeout_seconds`` (a stopped or frozen process) is killed, the others are stopped, and it
is the one named, with exit code 3. The last line names the rank to blame (see ``blame``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

from rannc_cli.errors import RanncError
from rannc_cli.fileio import require_file
from rannc_cli.runtime.heartbeat import PEER_LOST, BeatWatch, hang_timeout


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pump(stream: IO[bytes], out: IO[str] | None, prefix: str, lock: threading.Lock, log: IO[bytes] | None = None) -> None:
    for raw in iter(stream.readline, b""):
        with lock:
            if log is not None:
                try:
                    log.write(raw)
                    log.flush()
                except OSError as exc:  # disk full: say so once, keep the terminal output going
                    from rannc_cli.failures import os_error_line

                    print(f"rannc run: {os_error_line(exc, 'write rank log', getattr(log, 'name', None))} "
                          "(this rank's output continues on the terminal only)", file=sys.stderr, flush=True)
                    log = None
            if out is not None:
                line = raw.decode(errors="replace")
                out.write(prefix + line if prefix else line)
                out.flush()
    stream.close()


def run_local(script: str | Path, script_args: list[str], nproc: int, stages: int | None = None,
              replicas: list[int] | None = None, microbatches: int | None = None, schedule: str | None = None,
              plan: str | Path | None = None, checkpoint: str | None = None, grace: float = 2.0,
              log_dir: str | Path | None = None, virtual_stages: int | None = None, zero: int | None = None) -> int:
    """Run ``script`` in ``nproc`` processes; return the exit code (see the module docstring)."""
    script = Path(script)
    require_file(script, "script", "pass the path of your training script")
    if nproc < 1:
        raise RanncError(f"--nproc must be at least 1 (got {nproc})")
    from rannc_cli.config import Settings, settings

    for flag, name, value in (("--stages", "stages", stages), ("--microbatches", "microbatches", microbatches),
                              ("--schedule", "schedule", schedule), ("--checkpoint", "checkpoint", checkpoint),
                              ("--virtual-stages", "virtual_stages", virtual_stages),
                              ("--zero", "zero", None if zero is None else str(zero))):
        if value is not None:
            settings.check(name, value, flag)  # the registry's rule, before any worker starts
    if replicas is not None:
        if stages is not None and stages != len(replicas):
            raise RanncError(f"--stages {stages} but --replicas names {len(replicas)} stages",
                             hint="give one replica count per stage")
        if sum(replicas) != nproc:  # every process runs a replica; none is left idle
            raise RanncError(f"--replicas {','.join(map(str, replicas))} use {sum(replicas)} processes, --nproc is "
                             f"{nproc}", hint=f"give replica counts that sum to {nproc}, or run with --nproc "
                                              f"{sum(replicas)}")
    from rannc_cli.planner.forced import Forced

    Forced(stages, None, microbatches, schedule, virtual=virtual_stages, zero=zero)  # contradicting flags: one line, here
    if stages is not None and not 1 <= stages <= nproc:
        raise RanncError(f"--stages {stages} must be between 1 and --nproc ({nproc})")
    if plan is not None:
        _check_plan_file(Path(plan), nproc, stages, replicas, microbatches, schedule, virtual_stages, zero)

    base = dict(os.environ)
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nproc),
                LOCAL_WORLD_SIZE=str(nproc), PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    base.setdefault("OMP_NUM_THREADS", "1")
    timeout = hang_timeout()
    for key, value in (("RANNC_STAGES", stages), ("RANNC_MICROBATCHES", microbatches),
                       ("RANNC_SCHEDULE", schedule), ("RANNC_PLAN", plan), ("RANNC_CHECKPOINT", checkpoint),
                       ("RANNC_REPLICAS", ",".join(map(str, replicas)) if replicas else None),
                       ("RANNC_VIRTUAL_STAGES", virtual_stages), ("RANNC_ZERO", zero)):
        if value is not None:
            base[key] = str(Path(value).resolve()) if key == "RANNC_PLAN" else str(value)

    Settings(environ=base).check_all()  # what every worker will read, checked once here
    logs: list[IO[bytes]] = []
    if log_dir is not None:
        log_dir = Path(log_dir)
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            logs = [open(log_dir / f"rank-{rank}.log", "ab") for rank in range(nproc)]
        except OSError as exc:
            raise RanncError(f"cannot write rank logs in {log_dir} ({exc.strerror})",
                             hint="pass a writable --log-dir") from None

    beat_dir = tempfile.mkdtemp(prefix="rannc-heartbeat-")  # every rank beats here; see runtime/heartbeat.py
    base["RANNC_HEARTBEAT_DIR"] = beat_dir
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
    hung: tuple[int, float] | None = None  # (rank, seconds without a heartbeat)
    ages: dict[int, float] = {}
    watch = BeatWatch(beat_dir, list(range(nproc))) if timeout > 0 else None
    next_look = 0.0
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
            now = time.monotonic()
            if watch is not None and hung is None and now >= next_look:
                next_look = now + 0.25
                live = [r for r, proc in enumerate(procs) if proc.poll() is None]
                ages = {r: a for r, a in watch.poll(live) if watch.started(r)}
                oldest = max(ages.items(), key=lambda item: item[1], default=None)
                if oldest is not None and oldest[1] > timeout:
                    hung = oldest
                    deadline = now  # nothing to wait for: the others are stuck waiting for it
            if failures and deadline is None:
                deadline = now + grace
            if deadline is not None and now > deadline:
                for rank, proc in enumerate(procs):
                    if proc.poll() is None:
                        stopped.add(rank)
                        # a stopped (SIGSTOP) process leaves SIGTERM pending: only SIGKILL ends it
                        proc.kill() if hung is not None and rank == hung[0] else proc.terminate()
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
        if watch is not None:
            watch.poll()  # the last word of ranks stopped while they were exiting with their own error
        shutil.rmtree(beat_dir, ignore_errors=True)
    for t in pumps:
        t.join(timeout=2.0)
    for log in logs:
        log.close()
    if not failures and hung is None:
        return 0
    rank, code, what = blame(failures, hung, stopped, ages, timeout, watch.failed if watch is not None else {})
    others = [r for r, _ in failures if r != rank] + sorted(stopped - {rank})
    tail = f"; stopped or lost ranks {', '.join(map(str, sorted(set(others))))}" if others else ""
    where = f" (see {Path(log_dir) / f'rank-{rank}.log'})" if log_dir is not None else ""
    print(f"rannc run: rank {rank} {what}{where}{tail}", file=sys.stderr, flush=True)
    return code


def blame(failures: list[tuple[int, int]], hung: tuple[int, float] | None, stopped: set[int],
          ages: dict[int, float], timeout: float, raised: dict[int, str] | None = None) -> tuple[int, int, str]:
    """(rank, exit code, what happened) of the rank to name: the one that failed or stopped answering first.

        blame([(0, 3)], None, {1}, {0: 0.4, 1: 0.9}, 60.0)   # -> (1, 3, "stopped answering first (...)")

    A rank that exited with its own error (not PEER_LOST) comes first, then one whose heartbeat
    said it was exiting with an uncaught exception (``raised``: stopped before its exit code
    came), then a rank whose heartbeat stopped, then a rank still running when the others had lost
    contact with it (the oldest heartbeat among them), then the first rank that lost contact."""
    own = next(((r, c) for r, c in failures if c != PEER_LOST), None)
    if own is not None:
        rank, code = own
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
            return rank, 128 - code, f"failed first (killed by {name}, exit code {128 - code})"
        return rank, code, f"failed first (exit code {code})"
    if raised:
        rank = min(raised)
        return rank, 1, f"failed first ({raised[rank]}; stopped while exiting)"
    if hung is not None:
        return hung[0], PEER_LOST, (f"stopped answering first (no heartbeat for {hung[1]:.1f} s, "
                                    f"hang_timeout_seconds {timeout:g}; it was hung or stopped, and was killed)")
    if failures and stopped:
        rank = max(sorted(stopped), key=lambda r: ages.get(r, 0.0))
        return rank, PEER_LOST, ("stopped answering first (the other ranks lost contact with it while it still ran; "
                                 "its heartbeat was alive, so its main thread was stuck)")
    rank, code = failures[0]
    return rank, code, f"failed first (exit code {code})"


def _check_plan_file(plan: Path, nproc: int, stages: int | None, replicas: list[int] | None,
                     microbatches: int | None, schedule: str | None, virtual_stages: int | None = None,
                     zero: int | None = None) -> None:
    """Refuse, before any worker starts, a plan file for another shape or contradicting forced flags."""
    from rannc_cli.planner.forced import Forced
    from rannc_cli.planner.planfile import check_forced, check_shape, load_plan

    require_file(plan, "plan file", "create one with `rannc plan --out FILE`")
    loaded = load_plan(plan)
    made = loaded.cluster or {}
    hint = None
    if made.get("nodes") == 1 and made.get("gpus_per_node"):
        hint = f"run it with --nproc {made['gpus_per_node']}, or make a plan with `rannc plan --nodes 1 --gpus {nproc}`"
    check_shape(loaded, 1, nproc, str(plan), hint)
    check_forced(loaded, Forced(stages, tuple(replicas) if replicas else None, microbatches, schedule,
                                virtual=virtual_stages, zero=zero), str(plan))


def _reap(procs: list[subprocess.Popen], timeout: float) -> None:
    end = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
