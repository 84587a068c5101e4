"""Which rank runs which stage replica, and the process groups the runtime needs.

    layout = Layout.from_plan(plan, world_size=4, gpus_per_node=4)
    layout.role(2)                 # (1, 0): rank 2 runs replica 0 of stage 1
    layout.roles(2)                # [(1, 0), (5, 0)] with an interleaved plan of 4 groups, v = 2
    groups = make_groups([(0, 1), (2, 3)], timeout)   # every rank calls this with the same sets

A plan names devices as (node, gpu); the rank of a device is ``node * gpus_per_node + gpu``,
the order in which torchrun, `rannc run`, Slurm and mpiexec number processes (one per GPU).
Ranks the plan does not use hold no stage; they still take part in collectives on the world.
With an interleaved plan (``virtual_stages`` v > 1) a rank of device group g runs stages g, g + p,
..., g + (v - 1) p, always as the same replica index (the plan gives those stages one device list).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Iterable

from rannc_cli.errors import RanncError
from rannc_cli.planner.plan import Plan


@dataclass
class Layout:
    stage_ranks: list[list[int]]  # stage -> ranks, in replica order
    world_size: int
    virtual: int = 1  # stages (chunks) per device group

    @property
    def groups(self) -> int:
        """p: the number of device groups (stages per chunk)."""
        return len(self.stage_ranks) // self.virtual

    @classmethod
    def from_plan(cls, plan: Plan, world_size: int, gpus_per_node: int) -> "Layout":
        stage_ranks = []
        for i, st in enumerate(plan.stages):
            ranks = [int(n) * gpus_per_node + int(g) for n, g in st.devices]
            bad = [r for r in ranks if not 0 <= r < world_size]
            if bad or any(not 0 <= int(g) < gpus_per_node for _, g in st.devices):
                raise RanncError(f"the plan puts stage {i} on devices {[list(d) for d in st.devices]}, but this job "
                                 f"has {world_size} processes ({gpus_per_node} per node)",
                                 hint="start as many processes as the plan's devices, or make a plan for this job")
            stage_ranks.append(ranks)
        return cls(stage_ranks, world_size, int(getattr(plan, "virtual_stages", 1) or 1))

    def roles(self, rank: int) -> list[tuple[int, int]]:
        """Every (stage, replica) ``rank`` runs, by stage index (one, or v with an interleaved plan)."""
        return [(s, ranks.index(rank)) for s, ranks in enumerate(self.stage_ranks) if rank in ranks]

    def role(self, rank: int) -> tuple[int, int] | None:
        """The first of ``roles(rank)``, None for a rank without a stage."""
        mine = self.roles(rank)
        return mine[0] if mine else None

    @property
    def used_ranks(self) -> list[int]:
        return sorted(r for ranks in self.stage_ranks for r in ranks)


def make_groups(rank_sets: Iterable[tuple[int, ...]], timeout: datetime.timedelta) -> dict[tuple[int, ...], Any]:
    """One process group per distinct set of two or more ranks; every rank must call this alike."""
    import torch.distributed as dist

    out: dict[tuple[int, ...], Any] = {}
    for ranks in sorted({tuple(sorted(r)) for r in rank_sets if len(set(r)) > 1}):
        out[ranks] = dist.new_group(list(ranks), timeout=timeout)
    return out
