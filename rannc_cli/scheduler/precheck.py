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


def check_cpus(spec: JobSpec, nodes: Iterable[dict[str, Any]], where: str, cap: int | None = None) -> None:
    """Enough nodes with the CPUs for one task per GPU (x ``cpus_per_gpu``), within the queue's per-node
    CPU cap (Slurm MaxCPUsPerNode); nodes that do not report CPUs are not held against the request."""
    need = spec.gpus * (spec.cpus_per_gpu or 1)
    what = f"{spec.gpus} task(s) x {spec.cpus_per_gpu or 1} CPU(s) per node"
    if cap is not None and need > cap:
        raise RanncError(f"{where} allows at most {cap} CPU(s) per node (MaxCPUsPerNode), {what} asked",
                         hint="ask for fewer GPUs per node, or another --queue")
    usable = [n for n in nodes if n.get("available", True) and int(n.get("gpus") or 0) >= spec.gpus]
    fits = [n for n in usable if not n.get("cpus") or int(n["cpus"]) >= need]
    if usable and len(fits) < spec.nodes:
        shapes = sorted({int(n.get("cpus") or 0) for n in usable})
        raise RanncError(f"{where} has {len(fits)} available node(s) with >= {need} CPUs for {what}, {spec.nodes} "
                         f"asked (CPUs per node there: {', '.join(map(str, shapes))})",
                         hint="ask for fewer GPUs per node or nodes, or another --queue")


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
