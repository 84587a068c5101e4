"""Job folders and their job.yaml record: what ran, where, and in which state each phase is.

    rec = JobRecord.create(logs_dir=Path("logs"), name="mlp", backend="slurm", spec=spec.to_dict())
    rec.dir            # logs/20261126-101500-mlp-3f2a9c1d/  (mode 0700)
    rec.phase("train").update(scheduler_id="42", state="PENDING"); rec.save()   # atomic
    rec = find_job("3f2a", logs_dir)      # by short id, folder name, or a phase's scheduler id

A job folder holds the rendered scripts, the profile, the plan, one log per rank and job.yaml.
The record survives CLI restarts: every command reads it again from disk.
"""

from __future__ import annotations

import datetime as _dt
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rannc_cli.errors import RanncError
from rannc_cli.fileio import write_text_atomic

FORMAT = "rannc-job"
VERSION = 1
PHASES = ("profile", "plan", "train")
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "SKIPPED")
RECORD = "job.yaml"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def make_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with the leaf readable by its owner only, whatever the umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(mode=0o700)
    os.chmod(path, 0o700)
    return path


@dataclass
class JobRecord:
    dir: Path
    data: dict[str, Any] = field(default_factory=dict)
    unreadable: str | None = None  # why job.yaml could not be read (see JobRecord.placeholder)

    # ------------------------------------------------------------------ creation and I/O
    @classmethod
    def create(cls, logs_dir: Path, name: str, backend: str, spec: dict[str, Any], host: str | None = None,
               make: bool = True) -> "JobRecord":
        """A new record; its folder is created (private) unless ``make`` is False (then call make_dir)."""
        short = secrets.token_hex(4)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        folder = (Path(logs_dir) / f"{stamp}-{name}-{short}").resolve()
        if make:
            make_private_dir(folder)
        data = {"format": FORMAT, "version": VERSION, "id": short, "name": name, "backend": backend,
                "host": host, "remote_dir": None, "created": now(), "spec": spec,
                "phases": {p: {"state": "NEW"} for p in PHASES}}
        return cls(folder, data)

    def make_dir(self) -> None:
        make_private_dir(self.dir)

    @classmethod
    def load(cls, folder: Path) -> "JobRecord":
        import yaml

        path = Path(folder) / RECORD
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise RanncError(f"{folder} has no {RECORD}", hint="is it a rannc job folder?") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RanncError(f"cannot read {path} ({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
        except yaml.YAMLError as exc:
            from rannc_cli.fileio import yaml_problem

            raise RanncError(f"{path} is not valid YAML ({yaml_problem(exc)})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise RanncError(f"{path} is not a rannc job record")
        phases = data.get("phases")
        missing = [k for k in ("id", "name", "backend") if not isinstance(data.get(k), str)]
        if not isinstance(phases, dict) or any(not isinstance(phases.get(p), dict) for p in PHASES):
            missing.append("phases")
        if missing:
            raise RanncError(f"{path} lacks {', '.join(missing)}")
        return cls(Path(folder).resolve(), data)

    @classmethod
    def placeholder(cls, folder: Path, why: str) -> "JobRecord":
        """A job whose job.yaml is unreadable: listed as UNKNOWN (id from the folder name), never refreshed."""
        folder = Path(folder).resolve()
        stem, _, short = folder.name.rpartition("-")
        name = stem.split("-", 2)[2] if stem.count("-") >= 2 else folder.name
        data = {"format": FORMAT, "version": VERSION, "id": short or folder.name, "name": name, "backend": "?",
                "host": None, "remote_dir": None, "spec": {}, "phases": {p: {"state": "UNKNOWN"} for p in PHASES}}
        return cls(folder, data, unreadable=why)

    def save(self) -> Path:
        import yaml

        if self.unreadable is not None:
            raise RanncError(f"job {self.id}: {self.unreadable}", hint="fix or remove that file")
        text = "# rannc job record (docs/scheduler.md); rewritten atomically by rannc submit/jobs/status/cancel\n"
        return write_text_atomic(self.dir / RECORD, text + yaml.safe_dump(self.data, sort_keys=False, width=120),
                                 mode=0o600, what="job record")

    # ------------------------------------------------------------------ accessors
    @property
    def id(self) -> str:
        return self.data["id"]

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def backend(self) -> str:
        return self.data["backend"]

    @property
    def host(self) -> str | None:
        return self.data.get("host")

    @property
    def exec_dir(self) -> str:
        """The job folder as the executing machine sees it (the remote copy in --host mode)."""
        return self.data.get("remote_dir") or str(self.dir)

    def phase(self, name: str) -> dict[str, Any]:
        return self.data["phases"][name]

    def set_phase(self, name: str, **values: Any) -> None:
        self.data["phases"][name].update(values)

    @property
    def state(self) -> str:
        """The job's overall state: the first phase that failed, else the last one that started."""
        if self.unreadable is not None:
            return "UNKNOWN"
        phases = self.data["phases"]
        for p in PHASES:
            if phases[p].get("state") in ("FAILED", "CANCELLED", "TIMEOUT"):
                return phases[p]["state"]
        train = phases["train"].get("state", "NEW")
        if train not in ("NEW", "PENDING"):
            return train
        for p in ("plan", "profile"):
            s = phases[p].get("state", "NEW")
            if s in ("RUNNING", "PENDING", "REQUEUED"):
                return s
        return train

    @property
    def final(self) -> bool:
        if self.unreadable is not None:
            return True  # nothing to refresh: the record says nothing
        return self.state in FINAL and self.data["phases"]["train"].get("state") in FINAL


def logs_dir() -> Path:
    from rannc_cli.config import settings

    return Path(settings.get("logs_dir")).expanduser()


def all_jobs(base: Path | None = None) -> list[JobRecord]:
    """Every job record under ``base`` (default: the logs_dir setting), oldest first; an unreadable
    job.yaml gives a placeholder record (state UNKNOWN, ``unreadable`` says why)."""
    base = base or logs_dir()
    out = []
    if not base.is_dir():
        return out
    for child in sorted(base.iterdir()):
        if (child / RECORD).is_file():
            try:
                out.append(JobRecord.load(child))
            except RanncError as exc:
                out.append(JobRecord.placeholder(child, exc.one_line()))
    return out


def find_job(ref: str, base: Path | None = None) -> JobRecord:
    """A job by short id (or a prefix of it), folder name or path, or a phase's scheduler id."""
    path = Path(ref)
    if (path / RECORD).is_file():
        return JobRecord.load(path)
    found = _find(ref, base)
    if found.unreadable is not None:
        raise RanncError(f"job {found.id}: {found.unreadable}",
                         hint="fix or remove that file (the folder still holds the job's scripts and logs)")
    return found


def _find(ref: str, base: Path | None) -> JobRecord:
    jobs = all_jobs(base)
    exact = [j for j in jobs if ref in (j.id, j.dir.name)]
    if not exact:
        exact = [j for j in jobs if any(str(ph.get("scheduler_id")) == ref for ph in j.data["phases"].values())]
    if not exact and len(ref) >= 3:
        exact = [j for j in jobs if j.id.startswith(ref) or j.dir.name.startswith(ref)]
    if not exact:
        raise RanncError(f"no job {ref!r} under {base or logs_dir()}", hint="`rannc jobs` lists them")
    if len(exact) > 1:
        raise RanncError(f"job {ref!r} is ambiguous ({', '.join(j.id for j in exact[:5])})",
                         hint="give more characters of the id")
    return exact[0]
