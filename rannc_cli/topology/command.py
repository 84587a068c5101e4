"""`rannc topology`: discover, optionally measure, write the topology file, print a summary.

    topology_command(scheduler=None, site=None, host=None, measure=False, as_json=False)

Prints one table row per node group (nodes, GPUs x model, memory, links) and the link costs
with their source; ``--json`` prints the topology file's content instead.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from rannc_cli.topology.format import LINK_KINDS, Node, Topology
from rannc_cli.topology.hostlist import compress


def topology_command(scheduler: str | None = None, site: str | None = None, host: str | None = None,
                     measure: bool = False, as_json: bool = False, out: Path | None = None,
                     partition: str | None = None, nodes: int | None = None, measure_procs: int | None = None,
                     measure_bytes: int | None = None) -> Topology:
    from rannc_cli.fileio import data_format
    from rannc_cli.topology.discover import discover

    out = out or Path("rannc-topology.yaml")
    data_format(out)  # refuse a suffix we cannot write before discovery
    topo = discover(scheduler=scheduler, site=site, host=host, partition=partition, nodes=nodes)
    if measure:
        from rannc_cli.topology import measure as m

        m.measure(topo, partition=partition, procs=measure_procs, nbytes=measure_bytes or m.DEFAULT_BYTES)
    out = out or Path("rannc-topology.yaml")
    topo.save(out)
    if as_json:
        print(json.dumps(topo.to_dict(), indent=2))
    else:
        print(render(topo, str(out)))
    return topo


def _gib(nbytes: int) -> str:
    return f"{nbytes / (1 << 30):.4g} GiB" if nbytes else "-"


def _mark(node: Node, key: str, text: str) -> str:
    """Facts from the site config carry a ``*``."""
    return text + ("*" if (node.get("sources") or {}).get(key) == "config" and text != "-" else "")


def _links_of(node: Node) -> str:
    parts = []
    pairs = list((node.get("gpu_pairs") or {}).values())
    if pairs:
        common = Counter(pairs).most_common(1)[0][0]
        parts.append(f"GPU pairs {common}" + (" (mixed)" if len(set(pairs)) > 1 else ""))
    nics = [n for n in node.get("nics") or [] if n.get("state") == "ACTIVE"]
    if nics:
        rates = Counter(f"{n.get('link_layer', 'IB')} {n.get('rate', '?').split(' (')[0]}" for n in nics)
        parts += [f"{c}x {r}" for r, c in rates.items()]
    if not parts and node.get("interconnect"):
        parts.append(_mark(node, "interconnect", str(node["interconnect"])))
    return "; ".join(parts) or "-"


def render(topo: Topology, path: str) -> str:
    from tabulate import tabulate

    rows = []
    for _, members in topo.groups():
        n = members[0]
        states = Counter(m.get("state", "?") for m in members)
        gpus = f"{n['gpus']} x {n['gpu_model'] or '?'}" if n["gpus"] else "0"
        rows.append([compress([m["name"] for m in members]), len(members),
                     _mark(n, "gpu_model", gpus), _mark(n, "gpu_memory_bytes", _gib(n["gpu_memory_bytes"])),
                     _mark(n, "cpus", str(n["cpus"] or "-")), _mark(n, "memory_bytes", _gib(n["memory_bytes"])),
                     ", ".join(f"{c} {s}" for s, c in states.items()),
                     ",".join(n.get("partitions") or []) or "-", _links_of(n)])
    for n in topo.unavailable_nodes:
        rows.append([n["name"], 1, f"{n['gpus']} x {n['gpu_model'] or '?'}" if n["gpus"] else "0",
                     _gib(n["gpu_memory_bytes"]), str(n["cpus"] or "-"), _gib(n["memory_bytes"]),
                     f"{n.get('state', '?')} (not used)", ",".join(n.get("partitions") or []) or "-",
                     (n.get("reason") or "")[:40]])
    where = topo.discovery.get("host", "local")
    how = {"site": "from the site config", "local": "by local discovery"}.get(topo.discovery.get("method", ""),
                                                                           f"through {topo.discovery.get('method')}")
    head = (f"scheduler {topo.scheduler}" + (f", site {topo.site}" if topo.site else "") +
            f"; found {how} on {'this machine' if where == 'local' else where}: {len(topo.nodes)} usable node(s), "
            f"{topo.total_gpus} GPU(s); fingerprint {topo.fingerprint}")
    lines = [head, tabulate(rows, headers=["nodes", "count", "GPUs", "GPU mem", "CPUs", "memory", "state",
                                           "partitions", "links"])]
    if topo.allocation:
        lines.append(f"allocation: {compress(topo.allocation)}")
    link_rows = [[k, f"{topo.links[k].bandwidth / 1e9:.3g} GB/s", f"{topo.links[k].latency * 1e6:.3g} us",
                  topo.links[k].source] for k in LINK_KINDS]
    lines += ["", tabulate(link_rows, headers=["link", "bandwidth", "latency", "source"])]
    if topo.measurement:
        m = topo.measurement
        lines.append(f"measured with {m.get('backend')} over {m.get('nodes')} node(s) x "
                     f"{m.get('processes_per_node')} process(es), {m.get('message_bytes', 0) >> 20} MiB messages ({m.get('how')})")
    if any((n.get("sources") or {}).get(k) == "config" for n in topo.nodes for k in n.get("sources") or {}):
        lines.append("* from the site config; everything else was discovered")
    if topo.discovery.get("nvml"):
        lines.append(f"GPU probe: {topo.discovery['nvml']}")
    lines += [f"note: {note}" for note in topo.notes]
    lines.append(f"wrote {path}")
    return "\n".join(lines)
