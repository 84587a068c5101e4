"""Event simulation of any plan: step time (bubbles included) and per-GPU peak memory.

    sim = simulate(plan, cost_model)
    sim.step_seconds, sim.memory[0], sim.events[:3]      # Event(stage, kind, microbatch, start, end)

Each stage runs its schedule's op list (schedules.py) in order. An op starts when the stage is
free and its data is there: F(s, m) after F(s-1, m) (p2p time is part of the receiving stage's
op, see costmodel.py), B(s, m) after B(s+1, m), the last stage's B(m) after its F(m). All replicas
of a stage work on their shares of a microbatch at once, so a stage is one timeline. Gradient
all-reduces start together once the pipeline has drained (no overlap with compute), each taking
its stage's all-reduce time; the step ends when the last one ends. As in the runtime, a parameter
shared by several stages (a tied embedding and output layer) is reduced over the union of their
replicas, not within each stage (``allreduce_times``); the search's objective leaves that out, so
``objective_seconds`` is the search's figure and ``step_seconds`` the simulated one.

Memory per GPU of a stage uses the largest number of microbatches it actually holds at once
under the schedule (GPipe: M, 1F1B: min(M, S - s)).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from rannc_cli.planner.costmodel import CostModel, StageCost, objective
from rannc_cli.planner.placement import allreduce_link
from rannc_cli.planner.plan import Plan, stage_costs
from rannc_cli.planner.schedules import peak_in_flight, stage_ops


@dataclass(frozen=True)
class Event:
    stage: int
    kind: str  # 'F', 'B' or 'AR'
    microbatch: int  # -1 for an all-reduce
    start: float
    end: float


@dataclass
class Simulation:
    step_seconds: float
    pipeline_seconds: float
    objective_seconds: float
    costs: list[StageCost]
    memory: list[float]  # peak bytes per GPU of each stage
    in_flight: list[int]
    busy: list[float]  # seconds each stage computes or communicates per step
    events: list[Event]

    @property
    def fits(self) -> bool:
        return all(c.feasible for c in self.costs)


def simulate_times(forward: list[float], backward: list[float], schedule: str, microbatches: int) -> tuple[float, list[Event]]:
    """Pipeline makespan and events for per-stage op durations (no all-reduce)."""
    stages = len(forward)
    orders = stage_ops(schedule, stages, microbatches)
    done: dict[tuple[str, int, int], float] = {}
    ptr = [0] * stages
    free = [0.0] * stages
    events: list[Event] = []
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for s in range(stages):
            ops = orders[s]
            while ptr[s] < len(ops):
                kind, m = ops[ptr[s]]
                if kind == "F":
                    dep = ("F", s - 1, m) if s > 0 else None
                else:
                    dep = ("B", s + 1, m) if s < stages - 1 else ("F", s, m)
                if dep is not None and dep not in done:
                    break
                start = max(free[s], done[dep] if dep is not None else 0.0)
                end = start + (forward[s] if kind == "F" else backward[s])
                done[(kind, s, m)] = end
                free[s] = end
                events.append(Event(s, kind, m, start, end))
                ptr[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:  # pragma: no cover - the schedules above never deadlock
            raise RuntimeError(f"schedule {schedule} deadlocked")
    return (max(free) if free else 0.0), events


_ORDERS: dict[tuple[str, int, int], list[list[tuple[bool, int]]]] = {}


def makespan(forward: list[float], backward: list[float], schedule: str, microbatches: int) -> float:
    """``simulate_times(...)[0]`` without the events: the same greedy sweep over plain lists, for
    the search's local moves, which simulate hundreds of boundary variants (tests check equality)."""
    S, M = len(forward), microbatches
    key = (schedule, S, M)
    if key not in _ORDERS:
        _ORDERS[key] = [[(k == "F", m) for k, m in ops] for ops in stage_ops(schedule, S, M)]
    orders = _ORDERS[key]
    fe = [[-1.0] * M for _ in range(S)]
    be = [[-1.0] * M for _ in range(S)]
    ptr = [0] * S
    free = [0.0] * S
    remaining = 2 * S * M
    while remaining:
        progressed = False
        for s in range(S):
            ops, p, t = orders[s], ptr[s], free[s]
            fs, bs, fe_s, be_s = forward[s], backward[s], fe[s], be[s]
            fprev = fe[s - 1] if s > 0 else None
            bnext = be[s + 1] if s < S - 1 else fe_s
            while p < len(ops):
                isf, m = ops[p]
                d = (fprev[m] if fprev is not None else 0.0) if isf else bnext[m]
                if d < 0:
                    break
                t = (d if d > t else t) + (fs if isf else bs)
                (fe_s if isf else be_s)[m] = t
                p += 1
            if p != ptr[s]:
                progressed = True
                remaining -= p - ptr[s]
                ptr[s], free[s] = p, t
        if not progressed:  # pragma: no cover - the schedules never deadlock
            raise RuntimeError(f"schedule {schedule} deadlocked")
    return max(free) if free else 0.0


def allreduce_times(cm: CostModel, stages: Sequence[tuple[int, int, int, Sequence[Sequence[int]]]]) -> list[float]:
    """Each stage's gradient all-reduce seconds as the runtime runs it, for stages given as
    (start block, end block, replicas, devices): the parameters only this stage uses over its
    replicas, then every set of parameters shared with other stages over the union of those
    stages' replicas (one group per holder set, as runtime/allreduce.py buckets)."""
    prof = cm.profile
    users: dict[str, set[int]] = {}
    for i, (start, end, _r, _devs) in enumerate(stages):
        for b in range(start, end):
            for name in prof.blocks[b].params:
                users.setdefault(name, set()).add(i)
    shared: dict[frozenset[int], float] = {}
    for name, holders in users.items():
        info = prof.parameters[name]
        if len(holders) > 1 and info.trainable and info.kind == "parameter":
            shared[frozenset(holders)] = shared.get(frozenset(holders), 0.0) + float(info.bytes)
    out = []
    for i, (start, end, replicas, devs) in enumerate(stages):
        groups = [(h, nbytes) for h, nbytes in shared.items() if i in h]
        own = float(cm.range_info(start, end).trainable_bytes) - sum(nbytes for _, nbytes in groups)
        t = cm.allreduce(own, replicas, allreduce_link(devs))
        for holders, nbytes in groups:
            union = [d for j in sorted(holders) for d in stages[j][3]]
            t += cm.allreduce(nbytes, len(union), allreduce_link(union))
        out.append(t)
    return out


def simulate(plan: Plan, cm: CostModel) -> Simulation:
    """Simulate one training step of ``plan`` under the cost model."""
    costs = stage_costs(plan, cm)
    searched = objective(plan.schedule, plan.microbatches, costs)
    costs = [replace(c, allreduce=a) for c, a in zip(costs, allreduce_times(
        cm, [(st.start, st.end, st.replicas, st.devices) for st in plan.stages]))]
    pipe, events = simulate_times([c.forward for c in costs], [c.backward for c in costs], plan.schedule,
                                  plan.microbatches)
    orders = stage_ops(plan.schedule, len(plan.stages), plan.microbatches)
    held = [peak_in_flight(o) for o in orders]
    memory = []
    for i, (st, c) in enumerate(zip(plan.stages, costs)):
        again = cm.stage_cost(st.start, st.end, st.replicas, plan.microbatches, None, "intra", held[i], st.checkpoint)
        memory.append(again.memory)
    for i, c in enumerate(costs):
        if c.allreduce > 0:
            events.append(Event(i, "AR", -1, pipe, pipe + c.allreduce))
    step = pipe + max((c.allreduce for c in costs), default=0.0)
    busy = [plan.microbatches * (c.forward + c.backward) + c.allreduce for c in costs]
    return Simulation(step, pipe, searched, costs, memory, held, busy, events)
