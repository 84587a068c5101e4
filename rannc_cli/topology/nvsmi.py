"""GPU facts from `nvidia-smi` text output, for hosts reached without NVML (over SSH).

    QUERY_ARGV                                   # nvidia-smi --query-gpu=... --format=csv,noheader,nounits
    gpus = parse_query(stdout_of_query)          # [{"index": 0, "name": ..., "memory_bytes": ..., ...}]
    topo = parse_topo(stdout_of_topo_m)          # {"pairs": {"0-1": "NV12"}, "nvlinks": {0: {1: 12}},
                                                 #  "cpu_affinity": {0: "0-47"}, "numa_affinity": {0: 0},
                                                 #  "nics": {"mlx5_0": {0: "PIX", ...}}}
"""

from __future__ import annotations

import re
from typing import Any

QUERY_ARGV = ["nvidia-smi", "--query-gpu=index,name,memory.total,compute_cap,pci.bus_id",
              "--format=csv,noheader,nounits"]
TOPO_ARGV = ["nvidia-smi", "topo", "-m"]


def parse_query(text: str) -> list[dict[str, Any]]:
    """Rows of QUERY_ARGV's CSV (memory in MiB); fields nvidia-smi reports as [N/A] are left out."""
    gpus = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < 3 or not cells[0].isdigit():
            continue
        gpu: dict[str, Any] = {"index": int(cells[0]), "name": cells[1]}
        if cells[2].isdigit():
            gpu["memory_bytes"] = int(cells[2]) << 20
        if len(cells) > 3 and re.fullmatch(r"\d+\.\d+", cells[3]):
            gpu["compute_capability"] = cells[3]
        if len(cells) > 4 and ":" in cells[4]:
            gpu["pci_bus_id"] = cells[4]
        gpus.append(gpu)
    return gpus


def parse_topo(text: str) -> dict[str, Any]:
    """The matrix of `nvidia-smi topo -m` (old and new layouts, with or without NIC legend)."""
    lines = [ln.rstrip("\n") for ln in text.splitlines()]
    header: list[str] | None = None
    rows: dict[str, list[str]] = {}
    nic_legend: dict[str, str] = {}
    in_nic_legend = False
    for line in lines:
        if not line.strip():
            continue
        if line.strip().startswith("NIC Legend"):
            in_nic_legend = True
            continue
        if in_nic_legend:
            m = re.match(r"\s*(NIC\d+):\s*(\S+)", line)
            if m:
                nic_legend[m.group(1)] = m.group(2)
            continue
        if line.strip().startswith("Legend"):
            header = header or []
            in_nic_legend = False
            continue
        if header is None and "\t" in line and re.search(r"\bGPU0\b", line):
            header = [c.strip() for c in line.split("\t") if c.strip()]
            continue
        if header and re.match(r"^(GPU\d+|NIC\d+|mlx\S+|\S+)\t", line) and not line.startswith(" "):
            cells = [c.strip() for c in line.split("\t")]
            rows[cells[0]] = cells[1:]
    if not header:
        raise ValueError("no GPU matrix found in `nvidia-smi topo -m` output")
    devices = [h for h in header if h not in ("CPU Affinity", "NUMA Affinity", "GPU NUMA ID")]
    gpu_cols = [h for h in devices if re.fullmatch(r"GPU\d+", h)]
    out: dict[str, Any] = {"pairs": {}, "nvlinks": {}, "cpu_affinity": {}, "numa_affinity": {}, "nics": {}}
    for name, cells in rows.items():
        values = dict(zip(header, cells))
        if re.fullmatch(r"GPU\d+", name):
            i = int(name[3:])
            for other in gpu_cols:
                j = int(other[3:])
                kind = values.get(other, "").strip()
                if j <= i or not kind:
                    continue
                out["pairs"][f"{i}-{j}"] = kind
                m = re.fullmatch(r"NV(\d+)", kind)
                if m:
                    out["nvlinks"].setdefault(i, {})[j] = int(m.group(1))
                    out["nvlinks"].setdefault(j, {})[i] = int(m.group(1))
            if values.get("CPU Affinity"):
                out["cpu_affinity"][i] = values["CPU Affinity"]
            numa = values.get("NUMA Affinity", "")
            if numa.isdigit():
                out["numa_affinity"][i] = int(numa)
        elif name in devices:
            nic = nic_legend.get(name, name)
            out["nics"][nic] = {int(g[3:]): values[g] for g in gpu_cols if values.get(g)}
    out["gpus"] = len(gpu_cols)
    return out
