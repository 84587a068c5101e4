"""A plan: what the runtime executes (stages, replicas, devices, microbatches, schedule).

    plan = Plan(schedule="1f1b", microbatches=8, batch_size=256,
                stages=[StagePlan(0, 13, replicas=2, devices=[(0, 0), (0, 1)], checkpoint=False), ...])
    plan.validate(n_blocks=26, cluster=spec)        # RanncError on any broken invariant
    costs = stage_costs(plan, cost_model)           # StageCost per stage, links from the devices
    objective(plan.schedule, plan.microbatches, costs)

Stage ``s`` runs blocks ``start..end-1`` (contiguous in the profile's topological order, so data
dependencies only go forward) on ``replicas`` GPUs; each replica takes an equal share of each
microbatch.

Plan format v2 (docs/plan-format.md) adds ``virtual_stages`` (v chunks per GPU group with the
``interleaved`` schedule: S = p v stages, stage i on exactly stage i % p's devices), ``zero`` (1:
ZeRO-1, optimizer state sharded over each stage's replicas) and ``allreduce_overlap`` (gradient
buckets all-reduced during the stage's last backward); their defaults are what a v1 file means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rannc_cli.errors import RanncError
from rannc_cli.planner.cluster import ClusterSpec
from rannc_cli.planner.costmodel import CostModel, StageCost, objective
from rannc_cli.planner.placement import allreduce_link, link_in
from rannc_cli.planner.schedules import SCHEDULE_NAMES, peak_in_flight_per_stage, rank_ops


@dataclass
class StagePlan:
    start: int
    end: int
    replicas: int
    devices: list[tuple[int, int]]
    checkpoint: bool = False

    @property
    def blocks(self) -> list[int]:
        return list(range(self.start, self.end))


@dataclass
class Plan:
    schedule: str
    microbatches: int
    batch_size: int
    stages: list[StagePlan]
    profile_hash: str = ""
    cluster_fingerprint: str = ""
    graph_hash: str = ""  # the captured graph it was made for (profile model.graph_hash); checked by the runtime
    model: str = ""
    cluster: dict[str, Any] = field(default_factory=dict)
    predicted: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    virtual_stages: int = 1  # v chunks per GPU group ('interleaved' only); len(stages) = p * v
    zero: int = 0  # 1: ZeRO-1, optimizer state and step sharded over each stage's replicas
    allreduce_overlap: bool = False  # gradient buckets all-reduced during the stage's last backward

    @property
    def groups(self) -> int:
        """p: the number of GPU groups (stage i runs on group i % p)."""
        return len(self.stages) // max(1, self.virtual_stages)

    @property
    def devices_used(self) -> int:
        return sum(s.replicas for s in self.stages[:self.groups])

    def key(self) -> tuple:
        return (self.schedule, self.microbatches,
                tuple((s.start, s.end, s.replicas, tuple(s.devices), s.checkpoint) for s in self.stages),
                self.virtual_stages, self.zero, bool(self.allreduce_overlap))

    def validate(self, n_blocks: int, cluster: ClusterSpec | None = None, source: str = "plan") -> None:
        """Every block in exactly one stage, in order; replicas match devices; no GPU used twice
        (with ``virtual_stages`` v > 1: stage i on exactly stage i % p's devices, and nowhere else)."""
        def bad(what: str) -> RanncError:
            return RanncError(f"{source}: {what}", hint="re-run `rannc plan` to get a valid plan")

        if self.schedule not in SCHEDULE_NAMES:
            raise bad(f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULE_NAMES)}")
        if self.microbatches < 1 or self.batch_size < 1:
            raise bad("microbatches and batch_size must be at least 1")
        if not self.stages:
            raise bad("has no stages")
        v = self.virtual_stages
        if v < 1 or (v > 1 and self.schedule != "interleaved"):
            raise bad(f"virtual_stages {v} needs schedule interleaved (and must be at least 1)")
        if len(self.stages) % v:
            raise bad(f"{len(self.stages)} stages cannot form {v} chunks per GPU group (not a multiple of {v})")
        if self.zero not in (0, 1):
            raise bad(f"zero {self.zero!r} must be 0 or 1")
        p = self.groups
        expect = 0
        seen: set[tuple[int, int]] = set()
        for i, st in enumerate(self.stages):
            if i >= p:  # a later chunk of group i % p: the very same devices, checked once there
                home = self.stages[i % p]
                if st.start != expect or st.end <= st.start:
                    raise bad(f"stage {i} covers blocks {st.start}..{st.end - 1}; expected a non-empty range starting at {expect}")
                expect = st.end
                if st.replicas != home.replicas or [tuple(d) for d in st.devices] != [tuple(d) for d in home.devices]:
                    raise bad(f"stage {i} must run on exactly stage {i % p}'s devices (interleaved, {v} chunks per "
                              f"group), not {[list(d) for d in st.devices]}")
                continue
            if st.start != expect or st.end <= st.start:
                raise bad(f"stage {i} covers blocks {st.start}..{st.end - 1}; expected a non-empty range starting at {expect}")
            expect = st.end
            if st.replicas < 1 or len(st.devices) != st.replicas:
                raise bad(f"stage {i} has {st.replicas} replicas but {len(st.devices)} devices")
            for dev in st.devices:
                dev = (int(dev[0]), int(dev[1]))
                if dev in seen:
                    raise bad(f"GPU {list(dev)} is used by more than one replica")
                seen.add(dev)
                if cluster is not None and not (0 <= dev[0] < cluster.nodes and 0 <= dev[1] < cluster.gpus_per_node):
                    raise bad(f"stage {i} uses GPU {list(dev)}, outside the {cluster.nodes} x {cluster.gpus_per_node} cluster")
            if st.replicas > -(-self.batch_size // self.microbatches):
                raise bad(f"stage {i} has {st.replicas} replicas for microbatches of "
                          f"{-(-self.batch_size // self.microbatches)} samples; each replica needs one sample")
        if expect != n_blocks:
            raise bad(f"stages cover blocks 0..{expect - 1} but the profile has {n_blocks} blocks")


_HELD: dict[tuple[str, int, int, int], list[int]] = {}


def held_counts(schedule: str, groups: int, microbatches: int, virtual: int = 1) -> list[int]:
    """Most microbatches each of the ``groups * virtual`` stages holds at once (from ``rank_ops``;
    with 'zb' a microbatch is held until its W op), cached."""
    key = (schedule, groups, microbatches, virtual)
    if key not in _HELD:
        out = [0] * (groups * virtual)
        for ops in rank_ops(schedule, groups, microbatches, virtual):
            for s, k in peak_in_flight_per_stage(ops).items():
                out[s] = k
        _HELD[key] = out
    return list(_HELD[key])


def held_per_stage(plan: Plan) -> list[int]:
    """Most microbatches each stage of ``plan`` holds at once under its schedule."""
    return held_counts(plan.schedule, plan.groups, plan.microbatches, plan.virtual_stages)


def stage_costs(plan: Plan, cm: CostModel) -> list[StageCost]:
    """Cost of every stage of ``plan`` with its own checkpoint flags; links follow the devices (a
    hand-over between chunks on the same GPUs is local: no link)."""
    out = []
    prev = None
    held = held_per_stage(plan)
    for i, st in enumerate(plan.stages):
        same = prev is not None and [tuple(d) for d in prev] == [tuple(d) for d in st.devices]
        out.append(cm.stage_cost(st.start, st.end, st.replicas, plan.microbatches,
                                 None if same else link_in(prev, st.devices), allreduce_link(st.devices), held[i],
                                 st.checkpoint, zero=plan.zero, overlap=plan.allreduce_overlap,
                                 split_weight=plan.schedule == "zb"))
        prev = st.devices
    return out


def plan_objective(plan: Plan, cm: CostModel) -> float:
    return objective(plan.schedule, plan.microbatches, stage_costs(plan, cm))
