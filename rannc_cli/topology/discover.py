"""Put the pieces together: which scheduler, which host, which site config -> one Topology.

    topo = discover()                                   # this machine (or its Slurm/PBS if usable)
    topo = discover(scheduler="slurm", site="generic-slurm-gpu", partition="gpu")
    topo = discover(host="user@login.example")          # the same, over SSH
    topo = discover(site="abci-3.0", nodes=2)           # from the site config alone (off-site)

Precedence of facts: measured > discovered > config > default (docs/topology-format.md).
"""

from __future__ import annotations

import socket
from collections import Counter
from typing import Any

from rannc_cli.errors import RanncError
from rannc_cli.topology import nvsmi, sysfs
from rannc_cli.topology.format import Link, Node, Topology
from rannc_cli.topology.runner import LocalRunner, Runner
from rannc_cli.topology.site import Site, apply_site, load_site

SCHEDULERS = ("slurm", "pbs", "local")
# NVLink bandwidth per link and direction (bytes/s) by GPU compute capability major version.
NVLINK_PER_LINK = {6: 20e9, 7: 25e9, 8: 25e9, 9: 25e9, 10: 50e9}


PROBES = {"slurm": ["scontrol", "ping"], "pbs": ["pbsnodes", "-a"]}


def probe_scheduler(runner: Runner, name: str) -> str | None:
    """None when the scheduler answers there, else why not (command missing, or its error)."""
    probe = PROBES[name]
    if not runner.which(probe[0]):
        return f"{probe[0]} not found on {runner.host}"
    res = runner.run(probe, timeout=20)
    if res.rc == 0:
        return None
    why = (res.stderr or res.stdout).strip().splitlines()
    return f"{probe[0]} found on {runner.host} but {name} does not answer ({why[0] if why else f'exit {res.rc}'})"


def detect_scheduler(runner: Runner, notes: list[str]) -> str:
    """slurm if `scontrol` works there, else pbs if `pbsnodes` works, else local."""
    for name in PROBES:
        why = probe_scheduler(runner, name)
        if why is None:
            return name
        if "not found" not in why:
            notes.append(f"{why}; using local discovery")
    return "local"


def host_node(runner: Runner, notes: list[str]) -> tuple[Node, str]:
    """One node's facts (CPUs, memory, NUMA, IB ports, GPUs) and the NVML status, here or over SSH."""
    if isinstance(runner, LocalRunner):
        from rannc_cli.topology import nvml

        files = sysfs.snapshot("/")
        name = socket.gethostname().split(".")[0]
        gpus, pairs, status = nvml.probe()
    else:
        res = runner.run(sysfs.SNAPSHOT_SCRIPT + "; echo '==> /hostname <=='; hostname")
        files = sysfs.parse_snapshot_output(res.stdout)
        name = files.pop("/hostname", "").strip().split(".")[0] or runner.host
        gpus, pairs, status = _remote_gpus(runner, notes)
    node = Node(name=name, state="up", available=True, **sysfs.host_facts(files))
    if gpus:
        names = Counter(g["name"] for g in gpus)
        node["gpus"] = len(gpus)
        node["gpu_model"] = names.most_common(1)[0][0]
        node["gpu_memory_bytes"] = min(int(g.get("memory_bytes", 0)) for g in gpus)
        node["gpu_devices"] = gpus
        if len(names) > 1:
            notes.append(f"node {name}: mixed GPU models {dict(names)}; gpu_model is the most common one")
        if pairs:
            node["gpu_pairs"] = pairs
    node["sources"] = {k: "discovered" for k in ("gpus", "gpu_model", "gpu_memory_bytes", "cpus", "memory_bytes")
                       if node.get(k) or k == "gpus"}
    return node, status


def _remote_gpus(runner: Runner, notes: list[str]) -> tuple[list[dict[str, Any]], dict[str, str], str]:
    if not runner.which("nvidia-smi"):
        return [], {}, "unavailable: no nvidia-smi on " + runner.host
    res = runner.run(nvsmi.QUERY_ARGV)
    if res.rc != 0:
        return [], {}, f"unavailable: nvidia-smi failed on {runner.host} ({res.stderr.strip()[:120]})"
    gpus = nvsmi.parse_query(res.stdout)
    pairs: dict[str, str] = {}
    topo = runner.run(nvsmi.TOPO_ARGV)
    if topo.rc == 0 and len(gpus) > 1:
        try:
            parsed = nvsmi.parse_topo(topo.stdout)
            pairs = parsed["pairs"]
            for i, links in parsed["nvlinks"].items():
                if i < len(gpus):
                    gpus[i]["nvlinks"] = links
        except ValueError as exc:
            notes.append(f"`nvidia-smi topo -m` on {runner.host} unreadable ({exc})")
    return gpus, pairs, "ok (nvidia-smi)"


def discovered_links(node: Node) -> dict[str, Link]:
    """Nominal links from hardware found on a node: NVLink count x rate, active IB/RoCE port rates."""
    out: dict[str, Link] = {}
    pairs = node.get("gpu_pairs") or {}
    nv = [int(k[2:]) for k in pairs.values() if k.startswith("NV") and k[2:].isdigit()]
    if pairs and len(nv) == len(pairs):      # every GPU pair on NVLink: the slowest pair bounds p2p
        cc = (node.get("gpu_devices") or [{}])[0].get("compute_capability", "")
        per_link = NVLINK_PER_LINK.get(int(cc.split(".")[0]) if cc[:1].isdigit() else 0)
        if per_link:
            out["intra_node"] = Link(bandwidth=min(nv) * per_link, latency=5e-6, source="discovered")
    bandwidth = sysfs.active_nic_bandwidth(node.get("nics") or [])
    if bandwidth:
        out["inter_node"] = Link(bandwidth=bandwidth, latency=1e-5, source="discovered")
    return out


def discover(scheduler: str | None = None, site: str | None = None, host: str | None = None,
             partition: str | None = None, nodes: int | None = None) -> Topology:
    """Discover the cluster (see module doc); every failure a user can fix is a RanncError."""
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise RanncError(f"--scheduler {scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    site_cfg: Site | None = load_site(site) if site else None
    notes: list[str] = []
    runner: Runner
    if host:
        from rannc_cli.topology.ssh import SSHRunner

        runner = SSHRunner.connect(host)
    else:
        runner = LocalRunner()
    try:
        return _discover(runner, scheduler, site_cfg, partition, nodes, notes)
    finally:
        close = getattr(runner, "close", None)
        if close:
            close()


def _discover(runner: Runner, scheduler: str | None, site_cfg: Site | None, partition: str | None,
              count: int | None, notes: list[str]) -> Topology:
    if site_cfg is not None and not site_cfg.supported:
        notes.append(f"site {site_cfg.name} uses scheduler {site_cfg.scheduler!r}, whose nodes rannc topology cannot "
                     "query (it reads slurm and pbs): described from the site config")
    sched = scheduler
    if sched is None and site_cfg is not None:
        if not site_cfg.supported:   # e.g. Grid Engine: describe it from the config (--scheduler local inside a job)
            return _from_site(site_cfg, count, partition, runner, notes)
        if site_cfg.scheduler == "local":
            sched = "local"
        else:
            why = probe_scheduler(runner, site_cfg.scheduler)
            if why is not None:   # off-site: no scheduler to ask, the config is all we know
                notes.append(f"{why}: topology from the site config {site_cfg.name} only")
                return _from_site(site_cfg, count, partition, runner, notes)
            sched = site_cfg.scheduler
    if sched is None:
        sched = detect_scheduler(runner, notes)
    discovery: dict[str, Any] = {"method": sched, "host": runner.host}
    partitions: list[dict[str, Any]] = []
    allocation = None
    if sched == "local":
        node, status = host_node(runner, notes)
        discovery["nvml"] = status
        found = [node]
    else:
        if sched == "slurm":
            from rannc_cli.topology import slurm as backend
        else:
            from rannc_cli.topology import pbs as backend  # type: ignore[no-redef]
        facts = backend.discover(runner, partition)
        notes += facts.notes
        found = [Node(n) for n in facts.nodes]
        partitions, allocation = facts.partitions, facts.allocation
        if allocation:   # inside a job: the planner plans for what the job holds
            names = set(allocation)
            found = [n for n in found if n["name"] in names] or found
        if isinstance(runner, LocalRunner):
            _enrich_from_this_host(found, runner, discovery, notes)
        if count:
            usable = [n for n in found if n.get("available", True)]
            if len(usable) < count:
                raise RanncError(f"--nodes {count}: only {len(usable)} available node(s) found",
                                 hint="pick a smaller count or another --partition")
            found = usable[:count]
    if site_cfg is not None:
        apply_site(site_cfg, found, notes)
    usable = [n for n in found if n.get("available", True)]
    if not usable:
        raise RanncError(f"every node found on {runner.host} is down, drained or offline "
                         f"({', '.join(sorted({n.get('state', '?') for n in found}))})",
                         hint="pick another --partition or wait for nodes to return")
    topo = Topology(nodes=usable, scheduler=sched, site=site_cfg.name if site_cfg else None, partitions=partitions,
                    allocation=allocation, discovery=discovery, notes=notes,
                    unavailable_nodes=[n for n in found if not n.get("available", True)])
    _set_links(topo, site_cfg, found)
    return topo


def _enrich_from_this_host(nodes: list[Node], runner: Runner, discovery: dict[str, Any], notes: list[str]) -> None:
    """When this process runs on one of the nodes (inside a job), add its NVML/sysfs facts to that node."""
    import os

    me = os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]
    target = next((n for n in nodes if n["name"] == me), None)
    if target is None:
        return
    local, status = host_node(runner, notes)
    discovery["nvml"] = status
    for key in ("numa_nodes", "nics", "gpu_devices", "gpu_pairs"):
        if local.get(key):
            target[key] = local[key]
    if local["gpus"]:
        target["gpu_model"], target["gpu_memory_bytes"] = local["gpu_model"], local["gpu_memory_bytes"]
        target.setdefault("sources", {}).update(gpu_model="discovered", gpu_memory_bytes="discovered")


def _from_site(site_cfg: Site, count: int | None, partition: str | None, runner: Runner, notes: list[str]) -> Topology:
    group = None
    if partition:
        group = next((g["name"] for g in site_cfg.groups if partition in (g.get("queues") or [])), None)
        if group is None:
            raise RanncError(f"site {site_cfg.name} has no node group serving queue {partition!r}")
    found = site_cfg.nodes(count=count, group=group)
    topo = Topology(nodes=found, scheduler=site_cfg.scheduler, site=site_cfg.name,
                    partitions=[{"name": q, "nodes": [n["name"] for n in found if q in n["partitions"]]}
                                for q in site_cfg.raw.get("queues") or []],
                    discovery={"method": "site", "host": runner.host}, notes=notes)
    _set_links(topo, site_cfg, found)
    return topo


def _set_links(topo: Topology, site_cfg: Site | None, nodes: list[Node]) -> None:
    """config over default, then discovered over config (from the first node that has hardware facts)."""
    if site_cfg is not None:
        topo.links.update(site_cfg.links())
    for node in nodes:
        found = discovered_links(node)
        if found:
            topo.links.update(found)
            break
