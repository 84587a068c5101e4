"""Local backend: the same job scripts, run on this machine as detached process groups.

    backend = LocalBackend(LocalTransport())
    pid = backend.submit("logs/x/profile.sh", None, "logs/x/profile")
    backend.submit("logs/x/train.sh", pid, "logs/x/train")     # starts once profile.sh exited 0
    backend.cancel(pid)                                          # SIGTERM to the group, SIGKILL after 10 s

Each phase runs under ``python -m rannc_cli.scheduler.local_exec`` (a tiny stand-in for a batch
system: waits for the dependency, enforces the time limit with a SIGUSR1 warning, records the exit
code). The job id is that process's pid; ``rannc-pid`` in the phase folder ties the pid to the
job, so a pid reused by another program after a restart is not mistaken for the job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rannc_cli.errors import RanncError
from rannc_cli.scheduler.backend import CANCELLED_BY_USER, Backend, PhaseState, register

PIDFILE = "rannc-pid"
STARTED = "rannc-started"
PREEMPTED = "rannc-preempted"


@register
class LocalBackend(Backend):
    name = "local"
    submit_command = "bash"
    templates = ("profile.sh", "train.sh")
    remote_ok = False

    @classmethod
    def for_spec(cls, transport, spec) -> "LocalBackend":
        return cls(transport, spec.time_seconds, spec.signal_seconds)

    @staticmethod
    def submit_argv(script: str, depends_on: str | None, phase_dir: str, script_text: str | None = None) -> list[str]:
        return ["bash", script]

    @classmethod
    def precheck(cls, spec, runner) -> list[str]:
        """This machine's GPUs, or a bound on CPU processes where it has none."""
        gpus = _local_gpus()
        if gpus and spec.gpus > gpus:
            raise RanncError(f"--gpus {spec.gpus}: this machine has {gpus} GPU(s)")
        if gpus:
            return []
        cpus = os.cpu_count() or 1
        if spec.gpus > 4 * cpus:
            raise RanncError(f"--gpus {spec.gpus}: no GPU here, and {spec.gpus} CPU processes on {cpus} cores "
                             "would crawl", hint=f"use at most {4 * cpus}")
        return [f"no GPU on this machine: {spec.gpus} CPU processes (gloo)"]

    def __init__(self, transport, time_seconds: int | None = None, signal_seconds: int = 120):
        if getattr(transport, "remote", False):
            raise RanncError("the local backend runs on this machine only", hint="drop --host or pick slurm/pbs")
        super().__init__(transport)
        self.time_seconds = time_seconds
        self.signal_seconds = signal_seconds
        self._dirs: dict[str, str] = {}

    def submit(self, script: str, depends_on: str | None, phase_dir: str) -> str:
        Path(phase_dir).mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "rannc_cli.scheduler.local_exec", "--phase-dir", phase_dir]
        if depends_on:
            dep_dir = self._dirs.get(depends_on)
            if dep_dir is None:
                raise RanncError(f"local job {depends_on} was not submitted by this process; cannot depend on it")
            argv += ["--after-dir", dep_dir]
        if self.time_seconds:
            argv += ["--time", str(self.time_seconds), "--signal-seconds", str(self.signal_seconds)]
        argv += ["--", "bash", script]
        log = open(Path(phase_dir) / "batch.log", "ab")
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True)
        except OSError as exc:
            raise RanncError(f"cannot start {script} ({exc.strerror})") from None
        finally:
            log.close()
        job_id = str(proc.pid)
        (Path(phase_dir) / PIDFILE).write_text(job_id + "\n")
        self._dirs[job_id] = phase_dir
        return job_id

    @staticmethod
    def alive(job_id: str, phase_dir: str) -> bool:
        """True when pid ``job_id`` is our local_exec for ``phase_dir`` (not a reused pid)."""
        try:
            cmdline = Path(f"/proc/{int(job_id)}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return False
        try:
            stat = Path(f"/proc/{int(job_id)}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                return False
        except (OSError, IndexError):
            pass
        return os.fsencode(str(phase_dir)) in cmdline and b"rannc_cli.scheduler.local_exec" in cmdline

    def state(self, job_id: str, phase_dir: str) -> PhaseState:
        ended = self.ended(phase_dir)
        if ended is not None:
            return self._timeout(ended, Path(phase_dir))
        if self.alive(job_id, phase_dir):
            started = (Path(phase_dir) / STARTED).exists()
            return PhaseState("RUNNING" if started else "PENDING")
        # a zombie child of this very process may still need reaping before the exit file shows
        ended = self.ended(phase_dir)
        if ended is not None:
            return self._timeout(ended, Path(phase_dir))
        if (Path(phase_dir) / CANCELLED_BY_USER).exists():
            return PhaseState("CANCELLED", reason="cancelled by rannc cancel")
        return PhaseState("FAILED", reason="the process is gone and left no rannc-exitcode (killed?)")

    @staticmethod
    def _timeout(ended: PhaseState, phase_dir: Path) -> PhaseState:
        """A phase the time limit cut is TIMEOUT, also when its ranks checkpointed and exited 0."""
        from rannc_cli.scheduler.local_exec import TIME_WARNED, TIMED_OUT

        if ended.state not in ("COMPLETED", "FAILED"):
            return ended
        if (phase_dir / TIMED_OUT).exists():
            return PhaseState("TIMEOUT", ended.exit_code, reason="time limit reached; the job script was stopped",
                              restarts=ended.restarts)
        marker = phase_dir / PREEMPTED  # train.sh copies the ranks' rannc-preempted here
        if (phase_dir / TIME_WARNED).exists() and marker.exists():
            step = (marker.read_text().split() or ["?"])[0]
            return PhaseState("TIMEOUT", ended.exit_code, restarts=ended.restarts,
                              reason=f"time limit ahead: the ranks checkpointed at step {step} in "
                                     f"{phase_dir.parent / 'checkpoints'} and stopped (resumable)")
        return ended

    def cancel(self, job_id: str) -> None:
        try:
            pid = int(job_id)
        except ValueError:
            raise RanncError(f"local job id {job_id!r} is not a process id") from None
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        except PermissionError:
            raise RanncError(f"not allowed to signal process group {pid}") from None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            try:   # reap it if it is our own child (rannc submit --wait then cancel in one process)
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.1)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _local_gpus() -> int:
    try:
        from rannc_cli.topology import nvml

        gpus, _, _ = nvml.probe()
        return len(gpus)
    except Exception:  # noqa: BLE001 - no driver: a CPU machine
        return 0
