"""The cluster the planner plans for: node count, GPUs per node, GPU memory, four link costs.

    spec = ClusterSpec.from_flags(nodes=4, gpus=8, mem_per_gpu="16GiB")
    spec = ClusterSpec.from_topology("rannc-topology.yaml")
    spec.links["inter_node"].seconds(64 << 20)     # latency + bytes / bandwidth
    spec.fingerprint                                # recorded in plans

Links without a topology file come from the settings registry (``rannc config`` lists them:
``link_intra_bandwidth`` ...), which a user overrides with ``RANNC_<NAME>`` or the config file.
The planner assumes identical nodes; a topology with mixed node shapes is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from rannc_cli.errors import RanncError
from rannc_cli.topology.fingerprint import cluster_fingerprint

LINK_KINDS = ("intra_node", "inter_node", "allreduce_intra", "allreduce_inter")
_SETTING_NAMES = {"intra_node": "link_intra", "inter_node": "link_inter",
                  "allreduce_intra": "allreduce_intra", "allreduce_inter": "allreduce_inter"}

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str | int | float) -> int:
    """``parse_size("16GiB") == 17179869184``; plain numbers are bytes; GB means 10**9, GiB 2**30."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise RanncError(f"cannot read {text!r} as a memory size", hint="write it like 16GiB, 40GB or 17179869184")
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise RanncError(f"memory size {text!r} must be positive")
    return int(value)


@dataclass(frozen=True)
class Link:
    """A link: ``Link(12.5e9, 20e-6).seconds(nbytes)`` = latency + nbytes / bandwidth."""

    bandwidth: float  # bytes per second
    latency: float  # seconds per message
    source: str = "default"

    def seconds(self, nbytes: float) -> float:
        return self.latency + float(nbytes) / self.bandwidth


@dataclass(frozen=True)
class ClusterSpec:
    """Identical nodes with ``gpus_per_node`` GPUs of ``memory_per_gpu`` bytes each."""

    nodes: int
    gpus_per_node: int
    memory_per_gpu: int
    links: Mapping[str, Link] = field(default_factory=dict)
    gpu_model: str = ""
    source: str = "flags"

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise RanncError(f"a cluster needs at least one node and one GPU per node (got {self.nodes} x {self.gpus_per_node})",
                             hint="pass --nodes N --gpus G with N, G >= 1")
        if self.memory_per_gpu <= 0:
            raise RanncError("GPU memory must be positive", hint="pass --mem-per-gpu like 16GiB")
        missing = [k for k in LINK_KINDS if k not in self.links]
        if missing:
            raise RanncError(f"cluster spec lacks link costs for {', '.join(missing)}")
        for kind in LINK_KINDS:
            link = self.links[kind]
            if not link.bandwidth > 0 or link.latency < 0:
                raise RanncError(f"link {kind} needs a positive bandwidth and a non-negative latency "
                                 f"(got {link.bandwidth} B/s, {link.latency} s)")

    @property
    def devices(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def fingerprint(self) -> str:
        return cluster_fingerprint(self.node_dicts())

    def node_dicts(self) -> list[dict[str, Any]]:
        return [{"gpus": self.gpus_per_node, "gpu_model": self.gpu_model, "gpu_memory_bytes": self.memory_per_gpu}] * self.nodes

    def device(self, index: int) -> tuple[int, int]:
        """Global device index -> (node, gpu)."""
        return divmod(index, self.gpus_per_node)

    def with_nodes(self, nodes: int) -> "ClusterSpec":
        return ClusterSpec(nodes, self.gpus_per_node, self.memory_per_gpu, self.links, self.gpu_model, self.source)

    def describe(self) -> str:
        gib = self.memory_per_gpu / (1 << 30)
        model = f" {self.gpu_model}" if self.gpu_model else ""
        return f"{self.nodes} node(s) x {self.gpus_per_node}{model} GPU(s), {gib:.4g} GiB each"

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": self.nodes, "gpus_per_node": self.gpus_per_node, "memory_per_gpu": self.memory_per_gpu,
                "gpu_model": self.gpu_model, "source": self.source,
                "links": {k: {"bandwidth": v.bandwidth, "latency": v.latency, "source": v.source} for k, v in self.links.items()}}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_flags(cls, nodes: int, gpus: int, mem_per_gpu: str | int = "16GiB", gpu_model: str = "") -> "ClusterSpec":
        """Cluster from command-line flags; link costs from the settings registry."""
        return cls(int(nodes), int(gpus), parse_size(mem_per_gpu), default_links(), gpu_model, "flags")

    @classmethod
    def from_topology(cls, path: Path | str, nodes: int | None = None, gpus: int | None = None,
                      mem_per_gpu: str | int | None = None) -> "ClusterSpec":
        """Cluster from a topology file; --nodes/--gpus/--mem-per-gpu given too must agree with it
        (--nodes may ask for fewer nodes than the file has)."""
        nodes_list, links = _read_topology(Path(path))
        shapes = {(int(n.get("gpus", 0)), str(n.get("gpu_model", "") or ""), int(n.get("gpu_memory_bytes", 0) or 0))
                  for n in nodes_list}
        if len(shapes) != 1:
            raise RanncError(f"topology {path} has nodes of different shapes {sorted(shapes)}; the planner needs identical nodes",
                             hint="plan for one kind of node with --nodes/--gpus/--mem-per-gpu")
        g, model, mem = shapes.pop()
        count = len(nodes_list)
        if nodes is not None:
            if nodes > count:
                raise RanncError(f"--nodes {nodes} asks for more nodes than topology {path} has ({count})")
            count = nodes
        if gpus is not None and gpus != g:
            raise RanncError(f"--gpus {gpus} disagrees with topology {path} ({g} GPUs per node)", hint="drop --gpus")
        if mem_per_gpu is not None:
            mem = parse_size(mem_per_gpu)
        if mem <= 0:
            raise RanncError(f"topology {path} does not say the GPU memory", hint="pass --mem-per-gpu")
        base = default_links()
        merged = {k: links.get(k, base[k]) for k in LINK_KINDS}
        return cls(count, g, mem, merged, model, f"topology {path}")


def default_links() -> dict[str, Link]:
    """The four links from the settings registry (env RANNC_LINK_INTER_BANDWIDTH etc., config file, default)."""
    from rannc_cli.config import settings

    out = {}
    for kind, prefix in _SETTING_NAMES.items():
        bw, src = settings.resolve(prefix + "_bandwidth")
        lat, _ = settings.resolve(prefix + "_latency")
        out[kind] = Link(float(bw), float(lat), "setting" if src != "default" else "default")
    return out


def _read_topology(path: Path) -> tuple[list[Mapping[str, Any]], dict[str, Link]]:
    """Nodes and links of a topology file, through rannc_cli.topology.format when present."""
    try:
        from rannc_cli.topology.format import Topology
    except ImportError:  # the topology module is optional for the planner
        Topology = None  # type: ignore[assignment]
    if Topology is not None:
        topo = Topology.load(path)
        nodes = [dict(n) for n in topo.nodes]
        raw_links = {k: dict(v) for k, v in topo.links.items()}
    else:
        import yaml

        if not path.is_file():
            raise RanncError(f"topology file {path} does not exist", hint="write one with `rannc topology --out FILE`")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise RanncError(f"topology file {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict) or data.get("format") != "rannc-topology":
            raise RanncError(f"{path} is not a rannc topology file", hint="write one with `rannc topology --out FILE`")
        nodes = list(data.get("nodes") or [])
        raw_links = dict(data.get("links") or {})
    if not nodes:
        raise RanncError(f"topology {path} lists no nodes")
    links = {}
    for kind in LINK_KINDS:
        if kind in raw_links:
            item = raw_links[kind]
            try:
                links[kind] = Link(float(item["bandwidth"]), float(item["latency"]), str(item.get("source", "topology")))
            except (KeyError, TypeError, ValueError):
                raise RanncError(f"topology {path}: link {kind} needs numeric bandwidth and latency") from None
    return nodes, links
