"""The interface every scheduler backend implements, what they share, and the registry.

    backend = get_backend("slurm", transport)
    job_id = backend.submit("/path/job/train.sh", depends_on="41", phase_dir="/path/job/train")
    backend.state(job_id, "/path/job/train")      # PhaseState("RUNNING", ...)
    backend.cancel(job_id)
    backend_names()                               # ('local', 'pbs', 'slurm', ...)

Backends are sibling modules of ``rannc_cli.scheduler.backends``; each registers its class with
``@register``. Adding a batch system is one module there, one folder ``templates/<name>/`` and
its golden tests: nothing else names the backends, and imports go one way (backends import this
module, never the reverse; the registry finds them by listing the package).

States are normalised to PENDING, RUNNING, REQUEUED, COMPLETED, FAILED, CANCELLED, TIMEOUT,
UNKNOWN. A scheduler forgets finished jobs (Slurm without accounting, PBS without job
history), so every job script writes ``<phase>/rannc-exitcode`` when it ends: once the
scheduler no longer knows the job, that file says how it ended.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from rannc_cli.scheduler.spec import JobSpec

from rannc_cli.errors import RanncError

EXITCODE = "rannc-exitcode"
REQUEUED = "rannc-requeued"
CANCELLED_BY_USER = "rannc-cancelled"


@dataclass
class PhaseState:
    """A phase's normalised state; ``reason`` is the scheduler's own words (pending reason, comment).

    ``never`` is True when the scheduler says a pending job can never start as asked (Slurm
    PartitionConfig, PBS "Can Never Run", Grid Engine "cannot run in any queue"): waiting is pointless."""

    state: str
    exit_code: int | None = None
    reason: str | None = None
    restarts: int = 0
    never: bool = False


class Backend(ABC):
    """Submit a rendered script, ask a job's state, cancel it.

    Class attributes describe the batch system to the rest of rannc: ``submit_command`` (what must
    be on PATH), ``templates`` (the job scripts rendered from templates/<name>/) and ``queue_word``
    (what users call a queue there)."""

    name = "abstract"
    submit_command = ""
    status_command = ""   # what state() asks; its absence is reported with the scheduler's words
    templates: tuple[str, ...] = ("profile.sh", "train.sh", "rank.sh")
    queue_word = "queue"
    remote_ok = True      # can submit on a login node over SSH (--host)

    def __init__(self, transport):
        self.t = transport

    @classmethod
    def for_spec(cls, transport, spec: "JobSpec") -> "Backend":
        """The backend that submits ``spec``'s phases (the local one also enforces its time limit)."""
        return cls(transport)

    @staticmethod
    @abstractmethod
    def submit_argv(script: str, depends_on: str | None, phase_dir: str, script_text: str | None = None) -> list[str]:
        """The command line that submits ``script`` (shown by --dry-run, run by submit)."""

    @classmethod
    def precheck(cls, spec: "JobSpec", runner) -> list[str]:
        """Check the job fits what the cluster offers before anything is submitted; return notes.

        Raises RanncError when it cannot fit. The default finds the submit command; backends that
        can read the cluster's nodes override this (see rannc_cli.scheduler.precheck)."""
        if not runner.which(cls.submit_command):
            raise RanncError(f"{cls.submit_command} not found on {runner.host}",
                             hint=f"is {cls.name} installed and on PATH there? (or pick another --scheduler, or --host)")
        return [f"{cls.name}: the request was not checked against the cluster's nodes"]

    @classmethod
    def template_values(cls, spec: "JobSpec") -> dict[str, Any]:
        """Extra values this backend's templates use (its own time formats, resource lines); none by default."""
        return {}

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

    def forgotten(self, job_id: str, phase_dir: str, said: str, ended: PhaseState | None = None) -> PhaseState:
        """The state of a job its scheduler no longer reports: what the job script recorded, else
        cancelled through rannc, else UNKNOWN (a missing status command is reported first).

            return self.forgotten(job_id, phase_dir, "PBS no longer knows the job")
        """
        ended = ended if ended is not None else self.ended(phase_dir)
        if ended is not None:
            return ended
        restarts = self.restarts(phase_dir)
        if self.t.exists(f"{phase_dir}/{CANCELLED_BY_USER}"):
            return PhaseState("CANCELLED", reason="cancelled by rannc cancel", restarts=restarts)
        if self.status_command and not self.t.which(self.status_command):
            self.run_checked([self.status_command, job_id], self.status_command)
        return PhaseState("UNKNOWN", reason=f"{said} and it left no rannc-exitcode (see the batch log)",
                          restarts=restarts)

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


_REGISTRY: dict[str, type[Backend]] = {}


def register(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make ``cls`` reachable as ``--scheduler cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    from rannc_cli.scheduler import backends

    for info in pkgutil.iter_modules(backends.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{backends.__name__}.{info.name}")


def backend_names() -> tuple[str, ...]:
    """Every registered backend's name, sorted."""
    _load_all()
    return tuple(sorted(_REGISTRY))


def backend_class(name: str) -> type[Backend]:
    """The registered class for ``name``; one clear error for an unknown one."""
    if name not in _REGISTRY:
        _load_all()
    if name not in _REGISTRY:
        raise RanncError(f"unknown scheduler {name!r}", hint=f"use {' | '.join(backend_names())}")
    return _REGISTRY[name]


def get_backend(name: str, transport) -> Backend:
    """A backend instance for job-state queries and cancels."""
    return backend_class(name)(transport)
