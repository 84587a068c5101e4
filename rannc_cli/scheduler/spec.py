"""One job spec from the site config and the command-line flags, validated before anything is submitted.

    spec = resolve_spec(script=Path("train.py"), script_args=["--lr", "0.1"], nodes=2, gpus=4,
                        scheduler="slurm", site=None, queue="gpu", account=None, time="2:00:00")
    problems = validate_against(spec, runner)     # RanncError when the cluster cannot hold the job

Every value that reaches a job script lives here. Strings a user typed (name, script arguments,
paths, --env values) are rendered only through the templates' quoting filters
(rannc_cli.scheduler.templates); the checks here refuse what no quoting can make safe in a
scheduler directive line (newlines, control characters).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rannc_cli.errors import RanncError
from rannc_cli.fileio import require_file

DEVICES = ("auto", "cpu", "cuda")
_NAME_OK = re.compile(r"[^A-Za-z0-9_.-]+")
_DIRECTIVE_OK = re.compile(r"[A-Za-z0-9_.,:=+@/%-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def job_name(text: str) -> str:
    """A scheduler-safe job name: letters, digits, ``_ . -`` (others become ``-``), at most 40 chars."""
    cleaned = _NAME_OK.sub("-", text).strip("-.") or "job"
    return cleaned[:40]


def parse_time(text: str) -> int:
    """Seconds from ``2:00:00``, ``1-12:00:00``, ``30:00`` (mm:ss), ``90`` / ``90m`` (minutes), ``2h``."""
    raw = str(text).strip()
    m = re.fullmatch(r"(\d+)\s*([smhd]?)", raw)
    if m:
        value, unit = int(m.group(1)), m.group(2) or "m"
        seconds = value * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    else:
        m = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{1,2})(?::(\d{1,2}))?", raw)
        if not m:
            raise RanncError(f"--time {text!r} is not a duration",
                             hint="write it like 2:00:00 (h:mm:ss), 1-00:00:00 (d-h:mm:ss), 90m or 2h")
        days = int(m.group(1) or 0)
        if m.group(4) is None and m.group(1) is not None:   # d-hh:mm (Slurm)
            h, mi, s = int(m.group(2)), int(m.group(3)), 0
        elif m.group(4) is None:          # mm:ss, as Slurm and PBS read two fields
            h, mi, s = 0, int(m.group(2)), int(m.group(3))
        else:
            h, mi, s = int(m.group(2)), int(m.group(3)), int(m.group(4))
        seconds = days * 86400 + h * 3600 + mi * 60 + s
    if seconds <= 0:
        raise RanncError(f"--time {text!r} must be longer than zero")
    return seconds


def hms(seconds: int) -> str:
    """``7200 -> '2:00:00'`` (hours may exceed 24: PBS walltime and Slurm both accept it)."""
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def slurm_time(seconds: int) -> str:
    """Slurm's --time: whole minutes, rounded up, as D-HH:MM:SS."""
    minutes = -(-seconds // 60)
    d, rest = divmod(minutes * 60, 86400)
    body = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:00"
    return f"{d}-{body}" if d else body


def check_directive_value(what: str, value: str) -> str:
    """A value that goes into a ``#SBATCH``/``#PBS`` line: one plain token, nothing a parser could split."""
    if not _DIRECTIVE_OK.fullmatch(value):
        raise RanncError(f"{what} {value!r} cannot go into a job script directive",
                         hint="use letters, digits and . , : = + @ / % _ - only")
    return value


@dataclass
class JobSpec:
    """Everything a job script needs. Paths are as the executing machine sees them."""

    name: str
    backend: str
    script: str                      # the training script, absolute on the executing machine
    script_args: list[str]
    nodes: int
    gpus: int                        # per node; on the local backend: processes
    device: str = "auto"
    site: str | None = None
    queue: str | None = None
    account: str | None = None
    account_option: str | None = None    # site's form: "--account=<a>", "-W group_list=<g>", "-P <g>"
    time_seconds: int | None = None
    modules: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)       # site shell lines run first (env activation)
    directives: list[str] = field(default_factory=list)  # extra site directive bodies, e.g. "--constraint=a100"
    env: dict[str, str] = field(default_factory=dict)    # --env NAME=VALUE for every rank
    python: str = sys.executable
    workdir: str = ""                # where ranks start (the submit directory)
    cpus_per_gpu: int | None = None
    mem_per_gpu: int | None = None   # bytes, for the planner (site config); None: the planner's default
    signal_seconds: int = 120        # warning signal before the time limit (Slurm --signal=B:USR1@N)
    requeue: bool = True
    max_requeues: int = 3
    host: str | None = None
    templates_dir: str | None = None  # a site's own templates, searched before templates/
    scheduler_options: dict[str, Any] = field(default_factory=dict)  # the site's `submit: <backend>:` block
    mpi: str | None = None           # the site's MPI launcher (``submit: mpi:``, e.g. "mpirun"); None: the backend's own

    def summary(self) -> str:
        where = f" on {self.host}" if self.host else ""
        parts = [f"{self.nodes} node(s) x {self.gpus} {'GPU' if self.backend != 'local' else 'process'}(es)"
                 .replace("GPU(es)", "GPUs").replace("process(es)", "processes"),
                 f"backend {self.backend}{where}"]
        if self.queue:
            parts.append(f"queue {self.queue}")
        if self.time_seconds:
            parts.append(f"time {hms(self.time_seconds)}")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobSpec":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def _site_submit(site) -> dict[str, Any]:
    raw = (site.raw.get("submit") if site is not None else None) or {}
    if not isinstance(raw, dict):
        raise RanncError(f"site config {site.name}: 'submit:' must be a mapping")
    return raw


def resolve_spec(*, script: Path, script_args: list[str], nodes: int, gpus: int, scheduler: str | None = None,
                 site: str | None = None, queue: str | None = None, account: str | None = None,
                 time: str | None = None, name: str | None = None, env: list[str] | None = None,
                 device: str = "auto", host: str | None = None, python: str | None = None,
                 workdir: str | None = None) -> JobSpec:
    """Merge flags over the site config (flags win) into a JobSpec; one clear error for bad input."""
    from rannc_cli.config import settings
    from rannc_cli.topology.site import load_site

    if nodes < 1:
        raise RanncError(f"--nodes must be at least 1 (got {nodes})")
    if gpus < 1:
        raise RanncError(f"--gpus must be at least 1 (got {gpus})")
    if device not in DEVICES:
        raise RanncError(f"--device {device!r} is not one of {', '.join(DEVICES)}")
    require_file(script, "script", "pass the path of your training script")
    if script.suffix != ".py":
        raise RanncError(f"script {script} is not a Python file", hint="pass a .py training script")
    from rannc_cli.scheduler.backend import backend_names

    site_cfg = load_site(site) if site else None
    backend = scheduler or (site_cfg.scheduler if site_cfg else None) or settings.get("scheduler") or "local"
    names = backend_names()
    if backend not in names:
        why = f" (site {site_cfg.name} uses {backend})" if site_cfg and not scheduler else ""
        raise RanncError(f"scheduler {backend!r} is not one rannc can submit to{why}",
                         hint=f"use --scheduler {' | '.join(names)}")
    batch = [n for n in names if n != "local"]
    if backend == "local" and host:
        raise RanncError("--host needs a scheduler on that host", hint=f"add --scheduler {' | '.join(batch)}")
    if backend == "local" and nodes != 1:
        raise RanncError(f"the local backend runs on this machine only: --nodes {nodes} asked",
                         hint=f"use --nodes 1, or --scheduler {'|'.join(batch)} for several nodes")
    sub = _site_submit(site_cfg)
    group = (site_cfg.groups[0] if site_cfg and site_cfg.groups else {}) or {}
    queue = queue or (site_cfg.raw.get("default_queue") if site_cfg else None)
    if queue:
        check_directive_value("--queue", queue)
    if account:
        check_directive_value("--account", account)
    seconds = parse_time(time) if time else (parse_time(str(sub["time"])) if sub.get("time") else None)
    envs: dict[str, str] = {}
    for item in env or []:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_NAME.fullmatch(key):
            raise RanncError(f"--env {item!r} must be NAME=VALUE with NAME a shell variable name")
        if "\0" in value:
            raise RanncError(f"--env {key}: the value contains a NUL byte")
        envs[key] = value
    for a in script_args:
        if "\0" in a:
            raise RanncError("a script argument contains a NUL byte, which no command line can carry")
    signal_seconds = int(settings.get("requeue_signal_seconds"))
    if seconds:
        signal_seconds = max(10, min(signal_seconds, seconds // 2))
    templates_dir = sub.get("templates")
    if templates_dir and site_cfg is not None and not os.path.isabs(str(templates_dir)):
        from rannc_cli.topology.site import configs_dir

        templates_dir = str(configs_dir() / str(templates_dir))
    default_python = settings.get("remote_python") if host else sys.executable
    spec = JobSpec(
        name=job_name(name or script.stem),
        backend=backend,
        script=str(script.resolve()),
        script_args=list(script_args),
        nodes=nodes,
        gpus=gpus,
        device=device,
        site=site_cfg.name if site_cfg else None,
        queue=queue if backend != "local" else None,
        account=account,
        account_option=(site_cfg.raw.get("account_option") if site_cfg else None),
        time_seconds=seconds,
        modules=[str(m) for m in (site_cfg.raw.get("modules") or [])] if site_cfg else [],
        setup=[str(s) for s in sub.get("setup") or []],
        directives=[str(d) for d in sub.get("directives") or []],
        env=envs,
        python=python or str(sub.get("python") or default_python),
        workdir=workdir or os.getcwd(),
        cpus_per_gpu=int(sub["cpus_per_gpu"]) if sub.get("cpus_per_gpu") else None,
        mem_per_gpu=int(group["gpu_memory_bytes"]) if group.get("gpu_memory_bytes") else None,
        signal_seconds=signal_seconds,
        requeue=bool(settings.get("requeue")),
        max_requeues=int(settings.get("max_requeues")),
        host=host,
        templates_dir=str(templates_dir) if templates_dir else None,
        scheduler_options=_scheduler_options(sub, backend, site_cfg),
        mpi=str(sub["mpi"]) if sub.get("mpi") else None,
    )
    if site_cfg is not None and backend != "local":
        check_site_shape(site_cfg, nodes, gpus)
    if spec.time_seconds and site_cfg is not None and sub.get("max_time"):
        limit = parse_time(str(sub["max_time"]))
        if spec.time_seconds > limit:
            raise RanncError(f"--time {hms(spec.time_seconds)} exceeds site {site_cfg.name}'s limit {hms(limit)}")
    if spec.account_option and "<" not in spec.account_option:
        spec.account_option = None
    return spec


def _scheduler_options(sub: dict[str, Any], backend: str, site_cfg) -> dict[str, Any]:
    """The site's backend-specific settings (``submit: sge: {resource_types: ...}``), read by that backend only."""
    raw = sub.get(backend) or {}
    if not isinstance(raw, dict):
        raise RanncError(f"site config {site_cfg.name}: 'submit: {backend}:' must be a mapping")
    return dict(raw)


def check_site_shape(site_cfg, nodes: int, gpus: int) -> None:
    """``--gpus`` within the site's GPUs per node and ``--nodes`` within its node count (its config's node_groups)."""
    groups = [g for g in site_cfg.groups if g.get("gpus")]
    if not groups:
        return
    shape = ", ".join(f"{g['name']}: {g.get('count', '?')} node(s) x {g['gpus']} GPUs"
                      + (f" ({g['gpu_model']})" if g.get("gpu_model") else "") for g in groups)
    most = max(int(g["gpus"]) for g in groups)
    if gpus > most:
        raise RanncError(f"--gpus {gpus} exceeds site {site_cfg.name}'s GPUs per node ({shape})",
                         hint=f"use --gpus {most} or fewer per node, and more --nodes")
    fitting = [g for g in groups if int(g["gpus"]) >= gpus]
    if all(g.get("count") for g in fitting) and nodes > sum(int(g["count"]) for g in fitting):
        raise RanncError(f"--nodes {nodes} exceeds site {site_cfg.name}'s nodes with >= {gpus} GPUs ({shape})",
                         hint="ask for fewer nodes")


def validate_against(spec: JobSpec, runner) -> list[str]:
    """Check the job fits the cluster as its scheduler reports it (through ``runner``).

    Returns notes; raises RanncError when too few nodes of the asked shape exist, or the time
    limit exceeds the queue's. Each backend knows how to ask its scheduler (``Backend.precheck``)."""
    from rannc_cli.scheduler.backend import backend_class

    return backend_class(spec.backend).precheck(spec, runner)
