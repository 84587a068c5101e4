"""Compare a job request with what the cluster's scheduler offers, before anything is submitted.

    facts = slurm_facts.discover(runner, "gpu")
    notes = check_nodes(spec, facts.nodes, where="partition gpu", runner=runner)

Backends read the cluster their own way (``Backend.precheck``) and share these checks, so every
batch system refuses a request it can never run with the same kind of message.
"""

from __future__ import annotations

from typing import Any, Iterable

from rannc_cli.errors import RanncError
from rannc_cli.scheduler.spec import JobSpec, hms, parse_time


def require_command(spec: JobSpec, runner, command: str) -> None:
    """One line when the batch system's submit command is not on the (remote) PATH."""
    if not runner.which(command):
        raise RanncError(f"{command} not found on {runner.host}",
                         hint=f"is {spec.backend} installed and on PATH there? (or pick another --scheduler, or --host)")


def check_nodes(spec: JobSpec, nodes: Iterable[dict[str, Any]], where: str) -> None:
    """Enough available nodes with at least ``spec.gpus`` GPUs each, or RanncError with the shapes there."""
    usable = [n for n in nodes if n.get("available", True)]
    fits = [n for n in usable if int(n.get("gpus") or 0) >= spec.gpus]
    if len(fits) < spec.nodes:
        shapes = sorted({int(n.get("gpus") or 0) for n in usable})
        raise RanncError(f"{where} has {len(fits)} available node(s) with >= {spec.gpus} GPUs, "
                         f"{spec.nodes} asked (GPUs per node there: {', '.join(map(str, shapes)) or 'none'})",
                         hint="ask for fewer nodes or GPUs, or another --queue")


def check_time(spec: JobSpec, limit_text: str | None, where: str) -> None:
    """``--time`` within the queue's limit (``None``/``infinite``/unparsable: no limit known)."""
    limit = time_limit(limit_text)
    if spec.time_seconds and limit is not None and spec.time_seconds > limit:
        raise RanncError(f"--time {hms(spec.time_seconds)} exceeds {where}'s limit {limit_text}",
                         hint="ask for less time or another --queue")


def time_limit(text: str | None) -> int | None:
    """Seconds of a scheduler's limit text, None when unlimited or unknown."""
    if not text or str(text).lower() in ("infinite", "unlimited", "n/a"):
        return None
    try:
        return parse_time(str(text))
    except RanncError:
        return None
