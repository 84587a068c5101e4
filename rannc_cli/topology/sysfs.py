"""Host facts from /proc and /sys: CPUs, NUMA nodes, memory, InfiniBand/RoCE ports.

    files = snapshot("/")                 # {"/proc/meminfo": "...", "/sys/class/infiniband/mlx5_0/ports/1/rate": ...}
    host_facts(files)                     # {"cpus": 64, "numa_nodes": 2, "memory_bytes": ..., "nics": [...]}

Reading (``snapshot``, or ``SNAPSHOT_SCRIPT`` run over SSH) is kept apart from parsing
(``host_facts``), so the parser runs the same on this machine, on a remote one and on synthetic
trees in tests. A missing or unreadable file is a normal case: the fact is left out.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any

# Globs of every file the parser reads (absolute, as on the target machine).
PATTERNS = [
    "/proc/meminfo",
    "/sys/devices/system/cpu/online",
    "/sys/devices/system/node/online",
    "/sys/class/infiniband/*/ports/*/state",
    "/sys/class/infiniband/*/ports/*/rate",
    "/sys/class/infiniband/*/ports/*/link_layer",
]

# The same reading as a POSIX shell script (for a remote host): '==> path <==' then the content.
SNAPSHOT_SCRIPT = "for f in " + " ".join(PATTERNS) + "; do [ -r \"$f\" ] && { echo \"==> $f <==\"; cat \"$f\"; }; done; true"


def snapshot(root: str = "/") -> dict[str, str]:
    """Read the PATTERNS files under ``root`` (a synthetic tree in tests), keyed by their absolute path."""
    files: dict[str, str] = {}
    for pattern in PATTERNS:
        for real in sorted(glob.glob(os.path.join(root, pattern.lstrip("/")))):
            try:
                with open(real) as handle:
                    text = handle.read()
            except OSError:
                continue
            files["/" + os.path.relpath(real, root)] = text
    return files


def parse_snapshot_output(text: str) -> dict[str, str]:
    """Split SNAPSHOT_SCRIPT's output back into {path: content}."""
    files: dict[str, str] = {}
    current: str | None = None
    for line in text.splitlines(keepends=True):
        m = re.match(r"^==> (/\S+) <==\n?$", line)
        if m:
            current = m.group(1)
            files[current] = ""
        elif current is not None:
            files[current] += line
    return files


def parse_cpu_list(text: str) -> int:
    """Count the CPUs of a kernel list like ``0-3,8-11`` (12)."""
    count = 0
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        count += (int(hi) - int(lo) + 1) if hi else 1
    return count


def parse_ib_rate(text: str) -> float | None:
    """Bytes/s of an InfiniBand rate file such as ``100 Gb/sec (4X EDR)`` (12.5e9)."""
    m = re.match(r"\s*([\d.]+)\s*Gb/sec", text)
    return float(m.group(1)) * 1e9 / 8 if m else None


def host_facts(files: dict[str, str]) -> dict[str, Any]:
    """CPUs, NUMA nodes, memory and IB/RoCE ports from a snapshot; unknown facts are left out."""
    facts: dict[str, Any] = {}
    if "/sys/devices/system/cpu/online" in files:
        try:
            facts["cpus"] = parse_cpu_list(files["/sys/devices/system/cpu/online"])
        except ValueError:
            pass
    if "/sys/devices/system/node/online" in files:
        try:
            facts["numa_nodes"] = parse_cpu_list(files["/sys/devices/system/node/online"])
        except ValueError:
            pass
    m = re.search(r"^MemTotal:\s+(\d+)\s*kB", files.get("/proc/meminfo", ""), re.M)
    if m:
        facts["memory_bytes"] = int(m.group(1)) * 1024
    ports: dict[tuple[str, int], dict[str, Any]] = {}
    for path, text in files.items():
        m = re.match(r"^/sys/class/infiniband/([^/]+)/ports/(\d+)/(state|rate|link_layer)$", path)
        if not m:
            continue
        port = ports.setdefault((m.group(1), int(m.group(2))), {"name": m.group(1), "port": int(m.group(2))})
        value = text.strip()
        if m.group(3) == "state":
            port["state"] = value.split(":", 1)[-1].strip()       # "4: ACTIVE" -> "ACTIVE"
        elif m.group(3) == "rate":
            port["rate"] = value
            rate = parse_ib_rate(value)
            if rate is not None:
                port["rate_bytes"] = rate
        else:
            port["link_layer"] = value
    if ports:
        facts["nics"] = [ports[k] for k in sorted(ports)]
    return facts


def active_nic_bandwidth(nics: list[dict[str, Any]]) -> float | None:
    """Sum of the rates of ACTIVE ports (bytes/s): a node's nominal injection bandwidth."""
    rates = [n["rate_bytes"] for n in nics if n.get("state") == "ACTIVE" and n.get("rate_bytes")]
    return sum(rates) if rates else None
