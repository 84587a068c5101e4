"""What a scheduler backend (slurm.py, pbs.py) reports about its cluster.

    facts = slurm.discover(LocalRunner())
    facts.nodes, facts.partitions, facts.allocation, facts.notes
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SchedulerFacts:
    nodes: list[dict[str, Any]]  # one dict per node, in the topology file's node keys
    partitions: list[dict[str, Any]]  # Slurm partitions or PBS queues
    allocation: list[str] | None = None  # node names of the current job, when inside one
    notes: list[str] = field(default_factory=list)
