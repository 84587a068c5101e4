"""Slurm clusters: nodes from `scontrol show node`, partitions from `sinfo`, the job's allocation.

    nodes = parse_scontrol_nodes(text)          # [{"name": "n1", "gpus": 4, "gpu_types": {"a100": 4}, ...}]
    parts = parse_sinfo_partitions(text)        # [{"name": "gpu", "default": True, "nodes": [...], ...}]
    found = discover(LocalRunner())             # SchedulerFacts(nodes, partitions, allocation, notes)

Parsers take the commands' text, so they are tested against recorded outputs of several Slurm
versions and sites; ``discover`` runs the commands through a Runner (here or over SSH).
"""

from __future__ import annotations

import re
from typing import Any

from rannc_cli.errors import RanncError
from rannc_cli.topology import hostlist
from rannc_cli.topology.facts import SchedulerFacts
from rannc_cli.topology.runner import Runner

SCONTROL_NODES_ARGV = ["scontrol", "show", "node", "-o"]
SINFO_ARGV = ["sinfo", "-h", "-a", "-o", "%P|%a|%l|%N"]

# Node state words (any of them, in "IDLE+DRAIN", "DOWN*" ...) that mean: takes no new jobs.
_UNAVAILABLE = {"down", "drain", "drained", "draining", "drng", "fail", "failing", "not_responding",
                "powered_down", "power_down", "powering_down", "maint", "future", "unknown", "inval", "reboot_issued"}

_KEY = re.compile(r"(?:^|(?<=\s))([A-Za-z][A-Za-z0-9_]*)=")


def parse_key_values(record: str) -> dict[str, str]:
    """``Key=value`` pairs of one scontrol record; values may hold spaces (OS=, Reason=)."""
    text = " ".join(record.split())
    matches = list(_KEY.finditer(text))
    out: dict[str, str] = {}
    for m, nxt in zip(matches, matches[1:] + [None]):
        out[m.group(1)] = text[m.end(): nxt.start() if nxt else len(text)].strip()
    return out


def _records(text: str, first_key: str) -> list[str]:
    """Split scontrol output (one-line ``-o`` or multi-line blocks) into records."""
    records: list[str] = []
    for line in text.splitlines():
        if line.lstrip().startswith(first_key + "="):
            records.append(line)
        elif records and line.strip():
            records[-1] += " " + line
    return records


def parse_gres(gres: str) -> dict[str, int]:
    """GPU count per type of a Gres string: ``gpu:a100:4(S:0-1),gpu:v100:2`` -> {"a100": 4, "v100": 2}.

    An untyped ``gpu:4`` counts under ""; other gres (mps, shard) are ignored."""
    out: dict[str, int] = {}
    if not gres or gres in ("(null)", "N/A"):
        return out
    depth, cur, items = 0, "", []
    for ch in gres:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    for item in items:
        fields = re.sub(r"\(.*?\)", "", item).strip().split(":")
        if fields[0] != "gpu":
            continue
        count = 1
        if len(fields) >= 2 and re.fullmatch(r"\d+[KMG]?", fields[-1]):
            count = _count(fields[-1])
            kind = ":".join(fields[1:-1])
        else:
            kind = ":".join(fields[1:])
        out[kind] = out.get(kind, 0) + count
    return out


def _count(text: str) -> int:
    mult = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(text[-1], 1)
    return int(text.rstrip("KMG")) * mult


def state_available(state: str) -> bool:
    """False for DOWN, DRAIN(ED/ING), FAIL, NOT_RESPONDING (``*``), POWERED_DOWN, ..."""
    if state.endswith("*") or "*" in state:
        return False
    words = {w.lower() for w in re.split(r"[+*]", state) if w}
    return not (words & _UNAVAILABLE)


def parse_scontrol_nodes(text: str) -> list[dict[str, Any]]:
    """Nodes of `scontrol show node` (any layout): name, gpus, gpu_types, cpus, memory_bytes, state, ..."""
    nodes = []
    for record in _records(text, "NodeName"):
        kv = parse_key_values(record)
        types = parse_gres(kv.get("Gres", ""))
        if not types:   # some outputs only carry CfgTRES=...,gres/gpu=4,gres/gpu:a100=4
            pairs = re.findall(r"gres/gpu(?::([^=,]+))?=(\d+)", kv.get("CfgTRES", ""))
            types = {t: int(c) for t, c in pairs if t} or {t: int(c) for t, c in pairs if not t}
        types = {k: v for k, v in types.items() if v}
        state = kv.get("State", "UNKNOWN")
        node: dict[str, Any] = {
            "name": kv["NodeName"],
            "gpus": sum(types.values()),
            "gpu_model": "",
            "gpu_memory_bytes": 0,
            "cpus": _int(kv.get("CPUTot")),
            "memory_bytes": _int(kv.get("RealMemory")) << 20,
            "state": state.lower(),
            "available": state_available(state),
            "partitions": [p for p in kv.get("Partitions", "").split(",") if p],
        }
        if types:
            node["gpu_types"] = types
            named = [t for t in types if t]
            if len(named) == 1:
                node["gpu_model"] = named[0]
        for key, out in (("Sockets", "sockets"), ("CoresPerSocket", "cores_per_socket"), ("ThreadsPerCore", "threads_per_core")):
            if kv.get(key, "").isdigit():
                node[out] = int(kv[key])
        if kv.get("Reason"):
            node["reason"] = kv["Reason"]
        if kv.get("AvailableFeatures") not in (None, "", "(null)"):
            node["features"] = kv["AvailableFeatures"].split(",")
        nodes.append(node)
    return nodes


def _int(text: str | None) -> int:
    try:
        return int(str(text))
    except (TypeError, ValueError):
        return 0


def parse_sinfo_partitions(text: str) -> list[dict[str, Any]]:
    """Partitions of ``sinfo -h -a -o "%P|%a|%l|%N"`` (the default partition carries a ``*``)."""
    parts: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        cells = line.strip().split("|")
        if len(cells) != 4:
            continue
        name, avail, limit, nodes = cells
        default = name.endswith("*")
        name = name.rstrip("*")
        part = parts.setdefault(name, {"name": name, "state": avail.lower(), "default": default,
                                       "max_time": limit, "nodes": []})
        part["default"] = part["default"] or default
        if nodes and nodes != "(null)":
            part["nodes"] += [n for n in hostlist.expand(nodes) if n not in part["nodes"]]
    return list(parts.values())


def discover(runner: Runner, partition: str | None = None) -> SchedulerFacts:
    """Run scontrol and sinfo through ``runner``; nodes of ``partition`` only, when given."""
    res = runner.run(SCONTROL_NODES_ARGV)
    if res.rc != 0:
        why = (res.stderr or res.stdout).strip().splitlines()
        raise RanncError(f"`scontrol show node` failed on {runner.host}: {why[0] if why else f'exit {res.rc}'}",
                         hint="check that Slurm works there (SLURM_CONF, slurmctld reachable) or pass --scheduler local")
    nodes = parse_scontrol_nodes(res.stdout)
    notes: list[str] = []
    partitions: list[dict[str, Any]] = []
    info = runner.run(SINFO_ARGV)
    if info.rc == 0:
        partitions = parse_sinfo_partitions(info.stdout)
    else:
        notes.append(f"sinfo failed ({info.stderr.strip()[:120]}); partitions taken from the nodes")
        seen: dict[str, dict[str, Any]] = {}
        for n in nodes:
            for p in n["partitions"]:
                seen.setdefault(p, {"name": p, "nodes": []})["nodes"].append(n["name"])
        partitions = list(seen.values())
    if partition:
        known = {p["name"] for p in partitions} | {p for n in nodes for p in n["partitions"]}
        if partition not in known:
            raise RanncError(f"partition {partition!r} does not exist on {runner.host}",
                             hint=f"known partitions: {', '.join(sorted(known)) or 'none'}")
        nodes = [n for n in nodes if partition in n["partitions"]]
    allocation = None
    nodelist = runner.env("SLURM_JOB_NODELIST")
    if nodelist:
        allocation = hostlist.expand(nodelist)
        names = {n["name"] for n in nodes}
        missing = [a for a in allocation if a not in names]
        if missing:
            notes.append(f"allocation nodes not reported by scontrol: {hostlist.compress(missing)}")
    if not nodes:
        raise RanncError(f"Slurm on {runner.host} reports no nodes" + (f" in partition {partition!r}" if partition else ""))
    return SchedulerFacts(nodes=nodes, partitions=partitions, allocation=allocation, notes=notes)
