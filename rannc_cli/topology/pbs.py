"""PBS clusters (PBS Professional / OpenPBS, and Torque): nodes from `pbsnodes -a`, the job's PBS_NODEFILE.

    nodes = parse_pbsnodes_json(text)    # pbsnodes -a -F json (PBS Pro 13+ / OpenPBS)
    nodes = parse_pbsnodes_text(text)    # pbsnodes -a (PBS Pro and Torque layouts)
    found = discover(LocalRunner())      # SchedulerFacts(nodes, partitions, allocation, notes)

Each node: name, gpus (resources_available.ngpus, Torque ``gpus``), cpus (ncpus, Torque ``np``),
memory_bytes (resources_available.mem, Torque ``physmem``), state, available, partitions (queues
from the ``queue`` attribute or a site's ``Qlist`` resource). Several vnodes of one host are
summed into one node.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

from rannc_cli.errors import RanncError
from rannc_cli.topology.facts import SchedulerFacts
from rannc_cli.topology.runner import Runner

PBSNODES_JSON_ARGV = ["pbsnodes", "-a", "-F", "json"]
PBSNODES_ARGV = ["pbsnodes", "-a"]

_UNAVAILABLE = {"down", "offline", "state-unknown", "unknown", "unresolvable", "stale", "maintenance",
                "sleep", "provisioning", "wait-provisioning", "initializing"}
_UNITS = {"b": 1, "w": 8, "kb": 1 << 10, "kw": 8 << 10, "mb": 1 << 20, "mw": 8 << 20, "gb": 1 << 30,
          "gw": 8 << 30, "tb": 1 << 40, "tw": 8 << 40, "pb": 1 << 50}
_GPU_MODEL_KEYS = ("gpu_model", "gpu_type", "gputype", "gpu_name", "accelerator_model")


def parse_size(text: Any) -> int:
    """Bytes of a PBS size: ``196608000kb``, ``512gb``, ``1tb``, ``1024`` (bytes); 0 when unreadable."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*(\d+)\s*([kmgtp]?[bw])?\s*", str(text).lower())
    if not m:
        return 0
    return int(m.group(1)) * _UNITS[m.group(2) or "b"]


def state_available(state: str) -> bool:
    """False when any comma-separated state word means the node takes no jobs (down, offline, ...)."""
    return not ({w.strip().lower() for w in state.split(",")} & _UNAVAILABLE)


def _node(name: str, attrs: Mapping[str, Any], avail: Mapping[str, Any]) -> dict[str, Any]:
    """One node from its attributes and resources_available (Torque has no resources_available)."""
    status = _torque_status(str(attrs.get("status", "")))
    gpus = _int(avail.get("ngpus", attrs.get("gpus", 0)))
    cpus = _int(avail.get("ncpus", attrs.get("np", attrs.get("pcpus", status.get("ncpus", 0)))))
    mem = parse_size(avail.get("mem", status.get("physmem", status.get("totmem", 0))))
    state = str(attrs.get("state", "unknown"))
    queues: list[str] = []
    for source in (attrs.get("queue"), avail.get("Qlist"), avail.get("qlist")):
        if source:
            queues += [q.strip() for q in str(source).split(",") if q.strip() and q.strip() not in queues]
    node: dict[str, Any] = {
        "name": name, "gpus": gpus, "gpu_model": "", "gpu_memory_bytes": 0, "cpus": cpus, "memory_bytes": mem,
        "state": state.lower(), "available": state_available(state), "partitions": queues,
    }
    for key in _GPU_MODEL_KEYS:
        if avail.get(key):
            node["gpu_model"] = str(avail[key])
            break
    m = re.search(r"gpu_product_name=([^;,]+)(?:;gpu_memory_total=(\d+) MB)?", str(attrs.get("gpu_status", "")))
    if m and not node["gpu_model"]:   # Torque's per-GPU status (from NVML on the MOM)
        node["gpu_model"] = m.group(1).strip()
        node["gpu_memory_bytes"] = int(m.group(2) or 0) << 20
    if avail.get("host"):
        node["host"] = str(avail["host"]).split(".")[0]
    if attrs.get("properties"):  # Torque node properties, often the queue-like class of the node
        node["features"] = [p for p in str(attrs["properties"]).split(",") if p]
    if attrs.get("comment") or attrs.get("note"):
        node["reason"] = str(attrs.get("comment") or attrs.get("note"))
    return node


def _int(value: Any) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        return 0


def _torque_status(status: str) -> dict[str, str]:
    """Torque's ``status = rectime=...,ncpus=28,physmem=131916380kb,...`` as a mapping."""
    out = {}
    for item in status.split(","):
        key, sep, value = item.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def parse_pbsnodes_text(text: str) -> list[dict[str, Any]]:
    """Nodes of ``pbsnodes -a``: a name at column 0, then indented ``key = value`` lines."""
    raw: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            raw.append((line.strip(), {}, {}))
            continue
        if not raw:
            continue
        key, sep, value = line.strip().partition(" = ")
        if not sep:
            continue
        if key.startswith("resources_available."):
            raw[-1][2][key.split(".", 1)[1]] = value.strip()
        elif "." not in key:
            raw[-1][1][key] = value.strip()
    if not raw and text.strip():
        raise RanncError("`pbsnodes -a` printed no node records", hint="check that PBS works on that host")
    return _merge_vnodes([_node(name, attrs, avail) for name, attrs, avail in raw])


def parse_pbsnodes_json(text: str) -> list[dict[str, Any]]:
    """Nodes of ``pbsnodes -a -F json`` (``{"nodes": {name: {..., "resources_available": {...}}}}``)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RanncError(f"`pbsnodes -a -F json` did not print JSON ({exc.msg} at line {exc.lineno})") from None
    nodes = data.get("nodes") if isinstance(data, Mapping) else None
    if not isinstance(nodes, Mapping):
        raise RanncError("`pbsnodes -a -F json` printed no 'nodes' mapping")
    return _merge_vnodes([_node(name, attrs, attrs.get("resources_available") or {}) for name, attrs in nodes.items()])


def _merge_vnodes(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sum the vnodes of one host (``host[0]``, ``host[1]``) into one node named after the host."""
    out: dict[str, dict[str, Any]] = {}
    for n in nodes:
        host = n.pop("host", None)
        is_vnode_of_host = bool(host) and (n["name"] == host or n["name"].startswith(f"{host}["))
        key = host if is_vnode_of_host else n["name"]
        if key not in out:
            out[key] = {**n, "name": key}
            if key != n["name"]:
                out[key]["vnodes"] = [n["name"]]
            continue
        merged = out[key]
        for k in ("gpus", "cpus", "memory_bytes"):
            merged[k] += n[k]
        merged["available"] = merged["available"] and n["available"]
        if n["state"] != merged["state"]:
            merged["state"] = ",".join(sorted(set(merged["state"].split(",")) | set(n["state"].split(","))))
        merged["partitions"] += [q for q in n["partitions"] if q not in merged["partitions"]]
        merged["gpu_model"] = merged["gpu_model"] or n["gpu_model"]
        merged.setdefault("vnodes", []).append(n["name"])
    return list(out.values())


def parse_nodefile(text: str) -> list[str]:
    """Distinct short host names of a PBS_NODEFILE, in order (one line per MPI process there)."""
    seen: list[str] = []
    for line in text.split():
        name = line.strip().split(".")[0]
        if name and name not in seen:
            seen.append(name)
    return seen


def discover(runner: Runner, queue: str | None = None) -> SchedulerFacts:
    """Run pbsnodes (JSON form first) through ``runner``; the allocation from PBS_NODEFILE."""
    notes: list[str] = []
    res = runner.run(PBSNODES_JSON_ARGV)
    nodes: list[dict[str, Any]] | None = None
    if res.rc == 0 and res.stdout.lstrip().startswith("{"):
        nodes = parse_pbsnodes_json(res.stdout)
    else:
        res = runner.run(PBSNODES_ARGV)
        if res.rc != 0:
            why = (res.stderr or res.stdout).strip().splitlines()
            raise RanncError(f"`pbsnodes -a` failed on {runner.host}: {why[0] if why else f'exit {res.rc}'}",
                             hint="check that PBS works there or pass --scheduler local")
        nodes = parse_pbsnodes_text(res.stdout)
    queues: dict[str, dict[str, Any]] = {}
    for n in nodes:
        for q in n["partitions"]:
            queues.setdefault(q, {"name": q, "nodes": []})["nodes"].append(n["name"])
    if queue:
        if queue not in queues:
            raise RanncError(f"no node of {runner.host} lists queue {queue!r}",
                             hint=f"queues named by nodes: {', '.join(sorted(queues)) or 'none'}")
        nodes = [n for n in nodes if queue in n["partitions"]]
    allocation = None
    nodefile = runner.env("PBS_NODEFILE")
    if nodefile:
        try:
            with open(nodefile) as handle:
                allocation = parse_nodefile(handle.read())
        except OSError as exc:
            notes.append(f"PBS_NODEFILE {nodefile} unreadable ({exc.strerror})")
    if not nodes:
        raise RanncError(f"PBS on {runner.host} reports no nodes")
    return SchedulerFacts(nodes=nodes, partitions=list(queues.values()), allocation=allocation, notes=notes)
