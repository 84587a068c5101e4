"""Exhaustive search: every plan of the search space, priced one by one (small problems only).

    best, count = exhaustive(cost_model, bounds, space)     # Candidate with the least objective
    ranked, count = exhaustive_ranked(cost_model, bounds, space, keep=3)   # the 3 best, best first

Enumerates every split of the units into stages, every replica count per stage, both placements
the rule allows per stage (placement.py), every microbatch count, both schedules and every ZeRO setting of the space (all-reduce overlap
as the space says), and prices
each plan with the scalar cost model (links from the device lists, checkpointing only where a
stage does not fit without it, or as forced); plans cutting a blocked boundary between unequal
replica counts (redistribution.py) and, with ``all_devices``, plans leaving a GPU idle are skipped. It shares no code with the DP beyond the cost model and the
placement rule, so `search == exhaustive` checks the DP's recursion, bucketing and thresholds.
"""

from __future__ import annotations

import heapq
import itertools

from rannc_cli.errors import RanncError
from rannc_cli.planner.costmodel import SCHEDULES, CostModel, StageCost, in_flight, objective
from rannc_cli.planner.placement import allreduce_link, devices, link_in, starts
from rannc_cli.planner.search import Candidate, SearchSpace

MAX_UNITS = 12
MAX_DEVICES = 8


def exhaustive(cm: CostModel, bounds: list[int], space: SearchSpace, all_schedules: bool = True) -> tuple[Candidate | None, int]:
    """Best plan by brute force and the number of complete plans priced."""
    ranked, count = exhaustive_ranked(cm, bounds, space, all_schedules, keep=1)
    return (ranked[0] if ranked else None), count


def exhaustive_ranked(cm: CostModel, bounds: list[int], space: SearchSpace, all_schedules: bool = True,
                      keep: int = 1) -> tuple[list[Candidate], int]:
    """The ``keep`` best plans by brute force (least objective first; the first of equal ones as
    found) and the number of complete plans priced."""
    units = len(bounds) - 1
    if units > MAX_UNITS or cm.cluster.devices > MAX_DEVICES:
        raise RanncError(f"--exhaustive handles at most {MAX_UNITS} blocks and {MAX_DEVICES} GPUs "
                         f"(this problem: {units} blocks after coarsening, {cm.cluster.devices} GPUs)",
                         hint="drop --exhaustive, or plan a smaller model or cluster")
    g, total = cm.cluster.gpus_per_node, cm.cluster.devices
    schedules = list(SCHEDULES) if all_schedules and space.schedules == ["1f1b"] else space.schedules
    heap: list[tuple[float, int, Candidate]] = []   # the keep best, as (-objective, -order) so the worst pops first
    order = itertools.count()
    count = 0
    cache: dict[tuple, StageCost] = {}
    blocked = cm.cut_blocked()

    def cost(a: int, e: int, r: int, m: int, lin: str | None, ar: str, k: int, zero: int) -> StageCost:
        key = (a, e, r, m, lin, ar, k, zero)
        if key not in cache:
            cache[key] = cm.best_stage_cost(bounds[a], bounds[e], r, m, lin, ar, k, space.checkpoint, zero, space.overlap)
        return cache[key]

    for schedule, zero in [(sch, z) for sch in schedules for z in space.zero]:
        for m in space.microbatches:
            reps = [r for r in space.replicas if r <= cm.microbatch(m)]
            def leaf(layout: list[tuple[int, int, int, int]]) -> None:
                nonlocal count
                n = len(layout)
                if space.stages is not None and n != space.stages:
                    return
                if space.forced_replicas is not None and [r for _, _, r, _ in layout] != list(space.forced_replicas):
                    return
                if any(blocked[bounds[a]] and r != layout[i - 1][2] for i, (a, _, r, _) in enumerate(layout) if i):
                    return  # a value without a batch dimension would cross between unequal replica counts
                if space.all_devices and (layout[-1][3] + layout[-1][2] != total
                                          or sum(r for _, _, r, _ in layout) != total):
                    return
                costs = []
                prev = None
                for i, (a, e, r, s) in enumerate(layout):
                    devs = devices(s, r, g)
                    c = cost(a, e, r, m, link_in(prev, devs), allreduce_link(devs), in_flight(schedule, m, n, i), zero)
                    if not c.feasible:
                        return
                    costs.append(c)
                    prev = devs
                count += 1
                obj = objective(schedule, m, costs, space.tie)
                if len(heap) < keep or obj < -heap[0][0]:
                    cand = Candidate(obj, schedule, m, tuple((bounds[a], bounds[e], r, s, c.checkpoint)
                                                             for (a, e, r, s), c in zip(layout, costs)),
                                     1, zero, space.overlap)
                    item = (-obj, -next(order), cand)
                    if len(heap) < keep:
                        heapq.heappush(heap, item)
                    else:
                        heapq.heapreplace(heap, item)

            def walk(u: int, d: int, acc: list[tuple[int, int, int, int]]) -> None:
                if u == units:
                    leaf(acc)
                    return
                for e in range(u + 1, units + 1):
                    for r in reps:
                        for s in starts(d, r, g):
                            if s + r <= total:
                                acc.append((u, e, r, s))
                                walk(e, s + r, acc)
                                acc.pop()

            walk(0, 0, [])
    return [cand for _, _, cand in sorted(heap, key=lambda it: (-it[0], -it[1]))], count
