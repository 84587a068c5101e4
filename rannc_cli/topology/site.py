"""Site configs (configs/<site>.yaml): what a system's public documentation says about it.

    site = load_site("abci-3.0")              # or a path to a YAML file
    site.scheduler, site.supported           # "pbs", True
    nodes = site.nodes(count=2)              # synthetic nodes of the first group, sources: config
    links = site.links()                     # {"intra_node": Link(..., source="config"), ...}
    apply_site(site, nodes, notes)           # fill facts discovery did not find; mark sources

Discovered facts override config facts: a config value only fills a field discovery left empty,
and each node's ``sources`` says which is which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rannc_cli.errors import RanncError
from rannc_cli.paths import project_root
from rannc_cli.topology.format import LINK_KINDS, Link, Node

SUPPORTED_SCHEDULERS = ("slurm", "pbs", "local")
NODE_FACTS = ("gpus", "gpu_model", "gpu_memory_bytes", "cpus", "memory_bytes")
# All-reduce bus bandwidth as a fraction of the p2p link when a config gives only the link
# (ring all-reduce reaches about this share of the link in NCCL tests).
ALLREDUCE_EFFICIENCY = 0.8


def configs_dir() -> Path:
    return project_root() / "configs"


def available_sites() -> list[str]:
    """Names of the bundled site configs (configs/*.yaml except devices.yaml)."""
    return sorted(p.stem for p in configs_dir().glob("*.yaml") if p.stem != "devices")


@dataclass
class Site:
    name: str
    scheduler: str
    groups: list[dict[str, Any]]
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def supported(self) -> bool:
        """Whether rannc can drive this site's scheduler (slurm, pbs, local)."""
        return self.scheduler in SUPPORTED_SCHEDULERS

    def group_for(self, node: dict[str, Any]) -> dict[str, Any] | None:
        """The node group a discovered node belongs to: by partition/queue, else the only group."""
        parts = set(node.get("partitions") or [])
        for g in self.groups:
            if parts & set(g.get("queues") or []):
                return g
        return self.groups[0] if len(self.groups) == 1 else None

    def nodes(self, count: int | None = None, group: str | None = None) -> list[Node]:
        """Synthetic nodes from the config: ``count`` nodes of ``group`` (default: every node of every group)."""
        groups = [g for g in self.groups if group in (None, g["name"])]
        if not groups:
            raise RanncError(f"site {self.name} has no node group {group!r}",
                             hint=f"groups: {', '.join(g['name'] for g in self.groups)}")
        out: list[Node] = []
        for g in groups:
            n = int(g.get("count", 1)) if count is None else count
            width = len(str(max(n, 1)))
            for i in range(1, n + 1):
                node = Node({k: g[k] for k in NODE_FACTS if k in g}, name=f"{g['name']}{str(i).zfill(width)}",
                            state="config", available=True, partitions=list(g.get("queues") or []))
                if g.get("interconnect"):
                    node["interconnect"] = g["interconnect"]
                node["sources"] = {k: "config" for k in NODE_FACTS if k in g}
                out.append(node)
            if count is not None:
                break
        return out

    def links(self) -> dict[str, Link]:
        """Link costs the config states (source: config); all-reduce derived from p2p when absent."""
        given = self.raw.get("links") or {}
        out: dict[str, Link] = {}
        for kind in LINK_KINDS:
            if kind in given:
                out[kind] = Link(bandwidth=float(given[kind]["bandwidth"]), latency=float(given[kind]["latency"]),
                                 source="config")
        for ar, p2p in (("allreduce_intra", "intra_node"), ("allreduce_inter", "inter_node")):
            if ar not in out and p2p in out:
                out[ar] = Link(bandwidth=out[p2p]["bandwidth"] * ALLREDUCE_EFFICIENCY,
                               latency=out[p2p]["latency"] * 2, source="config")
        return out


def load_site(name: str) -> Site:
    """A bundled site by name (``configs/<name>.yaml``) or a YAML file path; one clear error otherwise."""
    import yaml

    path = Path(name)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = configs_dir() / f"{name}.yaml"
    if not path.is_file() or path.stem == "devices":
        raise RanncError(f"unknown site {name!r}", hint=f"known sites: {', '.join(available_sites())}, or a path to a site YAML")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RanncError(f"site config {path.name} is not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("scheduler"), str):
        raise RanncError(f"site config {path.name} needs at least 'scheduler:' and 'node_groups:'")
    groups = raw.get("node_groups") or []
    if not isinstance(groups, list) or not all(isinstance(g, dict) and g.get("name") for g in groups):
        raise RanncError(f"site config {path.name}: node_groups must be a list of mappings with a name")
    for g in groups:
        for key in ("gpus", "gpu_memory_bytes", "cpus", "memory_bytes", "count"):
            if key in g and not (isinstance(g[key], int) and g[key] >= 0):
                raise RanncError(f"site config {path.name}: node group {g['name']}: {key} must be a whole number >= 0")
    for kind, link in (raw.get("links") or {}).items():
        if kind not in LINK_KINDS or not isinstance(link, dict) or \
                not all(isinstance(link.get(k), (int, float)) for k in ("bandwidth", "latency")):
            raise RanncError(f"site config {path.name}: links.{kind} must be one of {', '.join(LINK_KINDS)} "
                             "with numeric bandwidth (bytes/s) and latency (s)")
    return Site(name=str(raw.get("name") or path.stem), scheduler=raw["scheduler"], groups=groups, raw=raw)


def apply_site(site: Site, nodes: list[Node], notes: list[str]) -> None:
    """Fill node facts discovery left empty from the site's matching group; record every fact's source.

    The GPU count is always the discovered one (0 on a CPU node is a fact); GPU model and memory
    are filled only for nodes that have GPUs."""
    for node in nodes:
        sources = node.setdefault("sources", {})
        for key in NODE_FACTS:
            if node.get(key) or key == "gpus":
                sources.setdefault(key, "discovered")
        group = site.group_for(node)
        if group is None:
            continue
        if group.get("interconnect") and "interconnect" not in node:
            node["interconnect"] = group["interconnect"]
            sources["interconnect"] = "config"
        if "gpus" in group and node["gpus"] and node["gpus"] != group["gpus"]:
            notes.append(f"node {node['name']}: {node['gpus']} GPUs found, site {site.name} says {group['gpus']}; "
                         "the discovered count wins")
        for key in ("gpu_model", "gpu_memory_bytes", "cpus", "memory_bytes"):
            if key not in group or (key.startswith("gpu_") and not node["gpus"]):
                continue
            if not node.get(key):
                node[key] = group[key]
                sources[key] = "config"
            elif key == "gpu_model" and node[key] in (node.get("gpu_types") or {}):
                # a Slurm gres type ("h100") is a hint, not a model name: take the config's name if it agrees
                hint = node[key].lower().replace("_", "").replace("-", "")
                if hint in str(group[key]).lower().replace(" ", "").replace("-", ""):
                    node[key] = group[key]
                    sources[key] = "config"
                else:
                    notes.append(f"node {node['name']}: scheduler says GPU type {node[key]!r}, site {site.name} "
                                 f"says {group[key]!r}; keeping the discovered one")
            elif key == "gpu_model" and node[key] != group[key]:
                notes.append(f"node {node['name']}: GPU {node[key]!r} found, site {site.name} says {group[key]!r}; "
                             "the discovered model wins")
