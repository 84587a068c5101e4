"""Where a stage's replicas go: the placement rule shared by the search, the exhaustive check and plans.

    starts(d=6, r=4, gpus_per_node=8)        # [8]: 4 GPUs do not fit in 6..7, so the next node
    devices(8, 4, 8)                         # [(1, 0), (1, 1), (1, 2), (1, 3)]
    link_in(prev_devices, these_devices)     # 'intra' when both stages share one node, else 'inter'

Rule (as Alpa's sub-meshes): a stage with r <= G replicas (G GPUs per node) lies inside one node;
a stage with r > G replicas takes r / G whole nodes (r must be a multiple of G). Stages are laid
out in pipeline order on global device indices (node * G + gpu): each stage starts right after
the previous one, or at the start of the next node. So consecutive stages share a node whenever
they fit in it, and every all-reduce group of r <= G replicas stays inside a node.
"""

from __future__ import annotations

from typing import Sequence

Device = tuple[int, int]


def replica_ok(r: int, gpus_per_node: int) -> bool:
    """A replica count the placement rule can place: at most one node, or whole nodes."""
    return r >= 1 and (r <= gpus_per_node or r % gpus_per_node == 0)


def starts(d: int, r: int, gpus_per_node: int) -> list[int]:
    """Start positions for a stage of ``r`` replicas when devices ``0..d-1`` are taken."""
    g = gpus_per_node
    out = []
    offset = d % g
    if offset == 0 or (r <= g and offset + r <= g):
        out.append(d)
    if offset != 0:
        out.append(d - offset + g)
    return out


def devices(start: int, r: int, gpus_per_node: int) -> list[Device]:
    return [divmod(i, gpus_per_node) for i in range(start, start + r)]


def one_node(devs: Sequence[Sequence[int]]) -> bool:
    return len({int(n) for n, _ in devs}) <= 1


def link_in(prev: Sequence[Sequence[int]] | None, devs: Sequence[Sequence[int]]) -> str | None:
    """Link a stage receives its inputs over: None for the first stage, 'intra' when the previous
    stage and this one all sit on one node, else 'inter'."""
    if prev is None:
        return None
    return "intra" if one_node(list(prev) + list(devs)) else "inter"


def allreduce_link(devs: Sequence[Sequence[int]]) -> str:
    return "intra" if one_node(devs) else "inter"


def contiguous(replicas: Sequence[int], gpus_per_node: int, total: int) -> list[list[Device]] | None:
    """Lay stages out in order, each at the first start the rule allows; None when they do not fit."""
    out: list[list[Device]] = []
    d = 0
    for r in replicas:
        if not replica_ok(r, gpus_per_node):
            return None
        s = starts(d, r, gpus_per_node)[0]
        if s + r > total:
            return None
        out.append(devices(s, r, gpus_per_node))
        d = s + r
    return out
