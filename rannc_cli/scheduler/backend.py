"""The interface every scheduler backend implements, and what they share.

    backend = get_backend("slurm", transport)
    job_id = backend.submit("/path/job/train.sh", depends_on="41", phase_dir="/path/job/train")
    backend.state(job_id, "/path/job/train")      # PhaseState("RUNNING", ...)
    backend.cancel(job_id)

States are normalised to PENDING, RUNNING, REQUEUED, COMPLETED, FAILED, CANCELLED, TIMEOUT,
UNKNOWN. A scheduler forgets finished jobs (Slurm without accounting, PBS without job
history), so every job script writes ``<phase>/rannc-exitcode`` when it ends: once the
scheduler no longer knows the job, that file says how it ended.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

from rannc_cli.errors import RanncError

EXITCODE = "rannc-exitcode"
REQUEUED = "rannc-requeued"
CANCELLED_BY_USER = "rannc-cancelled"


@dataclass
class PhaseState:
    state: str
    exit_code: int | None = None
    reason: str | None = None
    restarts: int = 0


class Backend(ABC):
    """Submit a rendered script, ask a job's state, cancel it."""

    name = "abstract"

    def __init__(self, transport):
        self.t = transport

    @abstractmethod
    def submit(self, script: str, depends_on: str | None, phase_dir: str) -> str:
        """Submit ``script`` (after ``depends_on`` succeeded, when given); return the scheduler's job id."""

    @abstractmethod
    def state(self, job_id: str, phase_dir: str) -> PhaseState:
        """The phase's current state."""

    @abstractmethod
    def cancel(self, job_id: str) -> None:
        """Cancel the job (pending or running)."""

    # ------------------------------------------------------------------ shared helpers
    def run_checked(self, argv: Sequence[str], what: str, timeout: float = 60):
        """Run a scheduler command; its failure becomes one line with the scheduler's own message."""
        res = self.t.run(list(argv), timeout=timeout)
        if res.rc == 127 or (res.rc != 0 and "No such file or directory" in res.stderr and argv[0] in res.stderr):
            raise RanncError(f"{argv[0]} not found on {self.t.host}",
                             hint=f"is {self.name} installed and on PATH there? (or pick another --scheduler)")
        if res.rc != 0:
            raise RanncError(f"{what} failed on {self.t.host}: {scheduler_message(res.stderr + chr(10) + res.stdout, res.rc)}")
        return res

    def ended(self, phase_dir: str) -> PhaseState | None:
        """The final state the job script recorded, if it got that far."""
        text = self.t.read_text(f"{phase_dir}/{EXITCODE}")
        if text is None:
            return None
        try:
            code = int(text.split()[0])
        except (ValueError, IndexError):
            return PhaseState("UNKNOWN", reason=f"unreadable {EXITCODE}")
        restarts = self.restarts(phase_dir)
        if code == 0:
            return PhaseState("COMPLETED", 0, restarts=restarts)
        if self.t.exists(f"{phase_dir}/{CANCELLED_BY_USER}"):
            return PhaseState("CANCELLED", code, restarts=restarts)
        return PhaseState("FAILED", code, reason=f"exit code {code}", restarts=restarts)

    def restarts(self, phase_dir: str) -> int:
        text = self.t.read_text(f"{phase_dir}/{REQUEUED}")
        try:
            return int(text.split()[0]) if text else 0
        except (ValueError, IndexError):
            return 0


def scheduler_message(text: str, rc: int) -> str:
    """The scheduler's own words from a failed command's output, on one line.

    Prefers the last ``...error: ...`` line (sbatch, and the sbatch output that Slurm's qsub wrapper
    quotes inside its own message), else the first non-empty line."""
    lines = [line.strip().strip("'").strip() for line in text.splitlines() if line.strip().strip("'").strip()]
    errors = [line for line in lines if "error:" in line.lower() or line.lower().startswith(("qsub:", "qdel:", "qstat:"))]
    chosen = errors[-1] if errors else (lines[0] if lines else f"exit code {rc}")
    return " ".join(chosen.split())[:400]


def get_backend(name: str, transport) -> Backend:
    if name == "slurm":
        from rannc_cli.scheduler.slurm import SlurmBackend

        return SlurmBackend(transport)
    if name == "pbs":
        from rannc_cli.scheduler.pbs import PBSBackend

        return PBSBackend(transport)
    if name == "local":
        from rannc_cli.scheduler.local import LocalBackend

        return LocalBackend(transport)
    raise RanncError(f"unknown scheduler {name!r}", hint="use slurm, pbs or local")
