"""The topology file: what `rannc topology` writes and the planner reads (docs/topology-format.md).

    topo = Topology.load("rannc-topology.yaml")
    topo.nodes[0]["gpus"], topo.nodes[0].gpu_model     # nodes read as mappings or attributes
    topo.links["inter_node"].bandwidth                  # bytes/second; .latency in seconds
    topo.fingerprint                                    # cluster_fingerprint(topo.nodes)
    topo.save("rannc-topology.yaml")                    # atomic

Plain data, YAML on disk, no torch import.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from rannc_cli.errors import RanncError
from rannc_cli.fileio import read_yaml, write_data_atomic
from rannc_cli.topology.fingerprint import cluster_fingerprint, node_shape

FORMAT_NAME = "rannc-topology"
FORMAT_VERSION = 1

LINK_KINDS = ("intra_node", "inter_node", "allreduce_intra", "allreduce_inter")
LINK_SOURCES = ("measured", "discovered", "config", "default")

# Conservative defaults when nothing better is known (documented in docs/topology-format.md).
DEFAULT_LINKS: dict[str, tuple[float, float]] = {
    "intra_node": (12e9, 10e-6),        # PCIe 3.0 x16 peer-to-peer
    "inter_node": (1.25e9, 50e-6),      # 10 Gb Ethernet
    "allreduce_intra": (6e9, 20e-6),
    "allreduce_inter": (0.6e9, 100e-6),
}


class _AttrDict(dict):
    """A dict whose keys also read as attributes (``d.gpus`` is ``d["gpus"]``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


class Node(_AttrDict):
    """One node: ``Node(name="n1", gpus=4, gpu_model="NVIDIA A100-SXM4-40GB", gpu_memory_bytes=40 << 30)``.

    Always has name, gpus, gpu_model, gpu_memory_bytes, cpus, memory_bytes; any other key is kept.
    """

    def __init__(self, data: Mapping[str, Any] | None = None, **kw: Any):
        super().__init__({"name": "", "gpus": 0, "gpu_model": "", "gpu_memory_bytes": 0, "cpus": 0, "memory_bytes": 0})
        self.update(data or {})
        self.update(kw)

    @property
    def shape(self) -> tuple[int, str, int]:
        """(GPU count, GPU model, GPU memory): what the fingerprint counts."""
        return node_shape(self)


class Link(_AttrDict):
    """A link cost: ``Link(bandwidth=25e9, latency=5e-6, source="measured")`` (bytes/s, seconds)."""

    def __init__(self, data: Mapping[str, Any] | None = None, **kw: Any):
        super().__init__(data or {})
        self.update(kw)

    def seconds(self, nbytes: float) -> float:
        """Time to move ``nbytes`` over this link: latency + bytes / bandwidth."""
        return float(self["latency"]) + float(nbytes) / float(self["bandwidth"])


def default_links() -> dict[str, Link]:
    """The four link kinds at their conservative defaults (source: default)."""
    return {k: Link(bandwidth=bw, latency=lat, source="default") for k, (bw, lat) in DEFAULT_LINKS.items()}


@dataclass
class Topology:
    """A cluster's nodes and link costs; see docs/topology-format.md for every key."""

    nodes: list[Node]                   # usable nodes (what the planner plans for)
    links: dict[str, Link] = field(default_factory=default_links)
    fingerprint: str = ""
    scheduler: str = "local"            # slurm | pbs | local (or the site's unsupported scheduler)
    site: str | None = None             # site config name, when one was used
    partitions: list[dict[str, Any]] = field(default_factory=list)   # Slurm partitions / PBS queues
    allocation: list[str] | None = None  # node names of the current job allocation, if inside one
    discovery: dict[str, Any] = field(default_factory=dict)          # how and where it was found
    measurement: dict[str, Any] | None = None                        # what --measure ran
    notes: list[str] = field(default_factory=list)
    created: str = ""
    unavailable_nodes: list[Node] = field(default_factory=list)       # down, drained, offline: shown, not planned for

    def __post_init__(self) -> None:
        self.nodes = [n if isinstance(n, Node) else Node(n) for n in self.nodes]
        self.unavailable_nodes = [n if isinstance(n, Node) else Node(n) for n in self.unavailable_nodes]
        self.links = {k: v if isinstance(v, Link) else Link(v) for k, v in self.links.items()}
        for kind, link in default_links().items():
            self.links.setdefault(kind, link)
        if not self.fingerprint:
            self.fingerprint = cluster_fingerprint(self.nodes)
        if not self.created:
            self.created = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()

    # ---------------------------------------------------------------- queries
    @property
    def total_gpus(self) -> int:
        return sum(int(n["gpus"]) for n in self.nodes)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n["name"] == name:
                return n
        raise RanncError(f"node {name!r} is not in the topology", hint="`rannc topology` lists the nodes")

    def groups(self) -> list[tuple[tuple, list[Node]]]:
        """Nodes grouped by identical hardware (GPUs, model, GPU memory, CPUs, memory), in first-seen order."""
        out: dict[tuple, list[Node]] = {}
        for n in self.nodes:
            key = (*n.shape, int(n.get("cpus") or 0), int(n.get("memory_bytes") or 0))
            out.setdefault(key, []).append(n)
        return list(out.items())

    def refresh_fingerprint(self) -> str:
        self.fingerprint = cluster_fingerprint(self.nodes)
        return self.fingerprint

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        self.refresh_fingerprint()
        data: dict[str, Any] = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "created": self.created,
            "scheduler": self.scheduler,
            "site": self.site,
            "discovery": dict(self.discovery),
            "nodes": [_plain(n) for n in self.nodes],
            "unavailable_nodes": [_plain(n) for n in self.unavailable_nodes],
            "links": {k: _plain(self.links[k]) for k in [*LINK_KINDS, *sorted(set(self.links) - set(LINK_KINDS))]},
            "partitions": [_plain(p) for p in self.partitions],
            "allocation": list(self.allocation) if self.allocation is not None else None,
            "measurement": _plain(self.measurement) if self.measurement is not None else None,
            "notes": list(self.notes),
        }
        return data

    @classmethod
    def from_dict(cls, data: Any, origin: str = "topology") -> "Topology":
        """Validate and build; every problem is one RanncError naming ``origin``."""
        hint = "write it again with `rannc topology --out FILE`"
        if not isinstance(data, Mapping):
            raise RanncError(f"{origin} is not a rannc topology file (not a mapping)", hint=hint)
        if data.get("format") != FORMAT_NAME:
            raise RanncError(f"{origin} is not a rannc topology file (format: {data.get('format')!r}, "
                             f"expected {FORMAT_NAME!r})", hint=hint)
        if data.get("version") != FORMAT_VERSION:
            raise RanncError(f"{origin} has topology format version {data.get('version')!r}; this rannc reads "
                             f"version {FORMAT_VERSION}", hint=hint)
        nodes = data.get("nodes")
        if not isinstance(nodes, list) or not nodes:
            raise RanncError(f"{origin} has no nodes (key 'nodes' must be a non-empty list)", hint=hint)
        for i, n in enumerate(nodes):
            _check_node(n, i, origin, hint)
        links = data.get("links") or {}
        if not isinstance(links, Mapping):
            raise RanncError(f"{origin}: 'links' must be a mapping of link kind to {{bandwidth, latency, source}}",
                             hint=hint)
        for kind, link in links.items():
            _check_link(kind, link, origin, hint)
        topo = cls(
            nodes=[Node(n) for n in nodes],
            links={k: Link(v) for k, v in links.items()},
            fingerprint="",
            scheduler=str(data.get("scheduler") or "local"),
            site=data.get("site"),
            partitions=list(data.get("partitions") or []),
            allocation=data.get("allocation"),
            discovery=dict(data.get("discovery") or {}),
            measurement=data.get("measurement"),
            notes=list(data.get("notes") or []),
            created=str(data.get("created") or ""),
            unavailable_nodes=[Node(n) for n in data.get("unavailable_nodes") or [] if isinstance(n, Mapping)],
        )
        stated = data.get("fingerprint")
        if stated and stated != topo.fingerprint:
            raise RanncError(f"{origin}: fingerprint {stated} does not match its nodes ({topo.fingerprint}); "
                             "the node list was edited", hint="delete the 'fingerprint' line or run `rannc topology` again")
        return topo

    @classmethod
    def load(cls, path: Path | str) -> "Topology":
        path = Path(path)
        data = read_yaml(path, "topology file", "write one with `rannc topology --out FILE`")
        return cls.from_dict(data, origin=f"topology file {path}")

    def save(self, path: Path | str) -> Path:
        """Write the topology, YAML or JSON by the suffix (.yaml, .yml, .json), atomically."""
        return write_data_atomic(Path(path), _plain(self.to_dict()), what="topology file")


def _plain(value: Any) -> Any:
    """Plain dicts/lists for yaml.safe_dump (Node and Link are dict subclasses)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_node(n: Any, i: int, origin: str, hint: str) -> None:
    if not isinstance(n, Mapping):
        raise RanncError(f"{origin}: nodes[{i}] is not a mapping", hint=hint)
    if not isinstance(n.get("name"), str) or not n.get("name"):
        raise RanncError(f"{origin}: nodes[{i}] has no name", hint=hint)
    for key in ("gpus", "gpu_memory_bytes", "cpus", "memory_bytes"):
        if key in n and not (_is_int(n[key]) and n[key] >= 0):
            raise RanncError(f"{origin}: node {n['name']}: {key} must be a whole number >= 0, got {n[key]!r}", hint=hint)
    if "gpu_model" in n and not isinstance(n["gpu_model"], str):
        raise RanncError(f"{origin}: node {n['name']}: gpu_model must be text, got {n['gpu_model']!r}", hint=hint)


def _check_link(kind: Any, link: Any, origin: str, hint: str) -> None:
    if not isinstance(link, Mapping):
        raise RanncError(f"{origin}: links.{kind} must be a mapping with bandwidth, latency, source", hint=hint)
    bw, lat = link.get("bandwidth"), link.get("latency")
    if not isinstance(bw, (int, float)) or isinstance(bw, bool) or bw <= 0:
        raise RanncError(f"{origin}: links.{kind}.bandwidth must be a positive number of bytes/second, got {bw!r}",
                         hint=hint)
    if not isinstance(lat, (int, float)) or isinstance(lat, bool) or lat < 0:
        raise RanncError(f"{origin}: links.{kind}.latency must be a number of seconds >= 0, got {lat!r}", hint=hint)
    if link.get("source") not in LINK_SOURCES:
        raise RanncError(f"{origin}: links.{kind}.source must be one of {', '.join(LINK_SOURCES)}, "
                         f"got {link.get('source')!r}", hint=hint)

