"""Which plans the runtime can run: values crossing stages must be redistributable between replicas.

    check_plan_runs(profile, plan)          # RanncError naming the first value the runtime refuses
    cut_blocked(profile)                    # [False, True, ...]: boundary b crossed by a value with no batch dim
    check_crossings(crossings, replicas=[1, 2], microbatches=1, dynamic_batch=True)   # what the runtime calls

A value produced by one stage and read by later ones is split along its batch dimension when the
replica counts differ (each replica takes the samples of its slice). A tensor without a batch
dimension (a loss, a batch statistic) cannot be split that way: each replica of the producer holds
its own partial value, so it may only cross between stages of equal replica counts. A model
captured with a fixed batch size cannot be sliced at all (one replica per stage, one microbatch).
The executor (runtime/executor.py) calls ``check_crossings`` with the values of its stage modules;
the planner calls the same function through ``check_plan_runs`` with the profile's values, and
the search never cuts a blocked boundary between unequal replica counts (search.py, refine.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

from rannc_cli.errors import RanncError

if TYPE_CHECKING:
    from rannc_cli.planner.plan import Plan
    from rannc_cli.profiler.format import Profile


@dataclass(frozen=True)
class Crossing:
    """A value made by stage ``producer`` and read by the later ``consumers``."""

    name: str
    is_tensor: bool
    batch_dim: int | None
    producer: int
    consumers: tuple[int, ...]


def check_crossings(crossings: Iterable[Crossing], replicas: Sequence[int], microbatches: int,
                    dynamic_batch: bool) -> None:
    """Raise the runtime's RanncError for the first value (or batch) it could not redistribute."""
    sliced = microbatches > 1 or max(replicas) > 1
    if sliced and not dynamic_batch:
        raise RanncError("the model was captured with a fixed batch size, so its batch cannot be split into "
                         "microbatches or among replicas",
                         hint="use a plan with one replica per stage and one microbatch, or make the model "
                              "accept any batch size")
    for v in crossings:
        if v.is_tensor and v.batch_dim is None and any(replicas[t] != replicas[v.producer] for t in v.consumers):
            raise RanncError(f"value {v.name} crosses from stage {v.producer} to stages {list(v.consumers)} without "
                             "a batch dimension, so it cannot be redistributed between different replica counts",
                             hint="give those stages the same number of replicas, or move the boundary")


def plan_crossings(profile: "Profile", bounds: Sequence[int]) -> list[Crossing]:
    """Stage-level crossings of the profile's values for stages cut at ``bounds`` ([0, ..., n])."""
    stage_of = {}
    for s in range(len(bounds) - 1):
        for b in range(bounds[s], bounds[s + 1]):
            stage_of[b] = s
    out = []
    for v in profile.values.values():
        if v.producer is None:
            continue  # user inputs are on every rank
        src = stage_of[v.producer]
        later = tuple(sorted({stage_of[c] for c in v.consumers if stage_of[c] != src}))
        if later:
            out.append(Crossing(v.id, v.is_tensor, v.batch_dim, src, later))
    return out


def dynamic_batch(profile: "Profile") -> bool:
    """Whether the profile's model was captured with a symbolic batch dimension (so it can be sliced)."""
    return bool(profile.model.get("dynamic_batch", True))


def check_plan_runs(profile: "Profile", plan: "Plan") -> None:
    """The runtime's acceptance check for ``plan`` (a planner Plan) on ``profile``'s values."""
    bounds = [st.start for st in plan.stages] + [plan.stages[-1].end]
    check_crossings(plan_crossings(profile, bounds), [st.replicas for st in plan.stages], plan.microbatches,
                    dynamic_batch(profile))


def cut_blocked(profile: "Profile") -> list[bool]:
    """Per block boundary b (0..n; b cuts before block b): whether a tensor without a batch dimension
    made before b is read at or after b, so stages on either side must have equal replica counts."""
    n = len(profile.blocks)
    out = [False] * (n + 1)
    for v in profile.values.values():
        if v.producer is None or not v.is_tensor or v.batch_dim is not None or not v.consumers:
            continue
        for b in range(v.producer + 1, max(v.consumers) + 1):
            out[b] = True
    return out
