"""Cluster fingerprint: one short hash of a cluster's shape, shared by topology files and plans.

    cluster_fingerprint([{"gpus": 8, "gpu_model": "V100", "gpu_memory_bytes": 16 << 30}] * 4)

Two clusters get the same fingerprint exactly when they have the same number of nodes and the
same multiset of node shapes (GPU count, GPU model, GPU memory). Node names, CPUs, host memory and
measured bandwidths do not count: a plan stays valid on another allocation of the same shape.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping


def node_shape(node: Mapping[str, Any]) -> tuple[int, str, int]:
    return (int(node.get("gpus", 0)), str(node.get("gpu_model", "") or ""), int(node.get("gpu_memory_bytes", 0) or 0))


def cluster_fingerprint(nodes: Iterable[Mapping[str, Any]]) -> str:
    shapes = sorted(node_shape(n) for n in nodes)
    return hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]
