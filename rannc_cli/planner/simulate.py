"""Event simulation of any plan: step time (bubbles included) and per-GPU peak memory.

    sim = simulate(plan, cost_model)
    sim.step_seconds, sim.memory[0], sim.events[:3]      # Event(stage, kind, microbatch, start, end)

Every GPU group (the replicas of a stage; with ``virtual_stages`` v > 1 the v chunks i, i + p, ...
of group i % p) runs its op list from ``schedules.rank_ops`` in order, one timeline per group. An
op starts when the group is free and its data is there: F(s, m) after F(s-1, m) (p2p time is part
of the receiving stage's op, see costmodel.py; between chunks on the same GPUs there is none),
B(s, m) after B(s+1, m), the last stage's B(m) after its F(m), and with 'zb' W(s, m) after B(s, m):
a zb stage's backward is B + W (``CostModel.split_arrays``: the profile's measured split where it
has one, else half the backward of blocks with parameters as W, none of parameter-free ones), B
takes the backward minus ``StageCost.weight``, W that weight. Gradient all-reduces: without ``allreduce_overlap`` they start once the
pipeline has drained; with it a stage's all-reduce is charged only its exposed part
(``costmodel.exposed_allreduce``) after its last gradient op (last B, or last W with 'zb'); a
group's chunks reduce one after another (``step_with_allreduce``). As in the runtime, a parameter
shared by several stages (a tied embedding and output layer) is reduced over the union of their
replicas, not within each stage (``allreduce_times``); the search's objective leaves that out, so
``objective_seconds`` is the search's figure (for 'interleaved' and 'zb', which the DP does not
price, the simulated step) and ``step_seconds`` the simulated one.

Memory per GPU: each stage holds the most microbatches its op list has in flight at once
(``schedules.peak_in_flight_per_stage``; GPipe M, 1F1B min(M, S - s), 'zb' until the W op); a
group's GPUs hold all its chunks (their memories added, the largest working peak once); ZeRO-1
divides the optimizer state by the stage's replicas.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from rannc_cli.planner.costmodel import SCHEDULES, CostModel, StageCost, bucket_bytes, exposed_allreduce, objective
from rannc_cli.planner.placement import allreduce_link
from rannc_cli.planner.plan import Plan, held_per_stage, stage_costs
from rannc_cli.planner.schedules import rank_ops


@dataclass(frozen=True)
class Event:
    stage: int
    kind: str  # 'F', 'B', 'W' (zb) or 'AR'
    microbatch: int  # -1 for an all-reduce
    start: float
    end: float
    group: int = -1  # the GPU group that ran it (stage % p; -1: the stage itself)


@dataclass
class Simulation:
    step_seconds: float
    pipeline_seconds: float
    objective_seconds: float
    costs: list[StageCost]
    memory: list[float]  # peak bytes per GPU of each stage (interleaved: of its group, all chunks)
    in_flight: list[int]
    busy: list[float]  # seconds each stage's group computes or communicates per step
    _events: list[Event] | Callable[[], list[Event]] = field(repr=False, compare=False)
    capacity: float = float("inf")

    @property
    def events(self) -> list[Event]:
        """Every op and all-reduce of the step, in the order the sweep ran them (built on first
        use: ranking plans needs only the times)."""
        if callable(self._events):
            self._events = self._events()
        return self._events

    @property
    def fits(self) -> bool:
        return all(c.feasible for c in self.costs) and all(m <= self.capacity for m in self.memory)


_RANK_ORDERS: dict[tuple[str, int, int, int], list[list[tuple[int, int, int]]]] = {}


def _orders(schedule: str, groups: int, microbatches: int, virtual: int) -> list[list[tuple[int, int, int]]]:
    """``rank_ops`` with kinds as 0 (F), 1 (B), 2 (W), cached."""
    key = (schedule, groups, microbatches, virtual)
    if key not in _RANK_ORDERS:
        code = {"F": 0, "B": 1, "W": 2}
        _RANK_ORDERS[key] = [[(code[k], m, s) for k, m, s in ops]
                             for ops in rank_ops(schedule, groups, microbatches, virtual)]
    return _RANK_ORDERS[key]


_PROGRAMS: dict[tuple[str, int, int, int], tuple] = {}


def _program(schedule: str, stages: int, microbatches: int, virtual: int) -> tuple:
    """The groups' op lists flattened into one order in which every op comes after the ops it
    waits for (the order a greedy sweep over the groups reaches them; it does not depend on the
    durations), cached: ``(prog, meta, last)`` with ``prog[i] = (data op, previous op of the
    group, duration slot)`` as 1-based op indices (0: no such op, time 0), duration slot
    ``kind * S + stage``, ``meta[i] = (kind, microbatch, stage, group)`` and ``last[g]`` the index
    of group g's last op (0 for none)."""
    key = (schedule, stages, microbatches, virtual)
    if key not in _PROGRAMS:
        S, M = stages, microbatches
        p = S // virtual
        orders = _orders(schedule, p, M, virtual)
        idx = [[[0] * M for _ in range(S)] for _ in range(3)]  # op index of (kind, stage, microbatch); 0: not yet
        fi, bi, wi = idx
        prog: list[tuple[int, int, int]] = []
        meta: list[tuple[int, int, int, int]] = []
        ptr = [0] * p
        last = [0] * p
        remaining = sum(len(o) for o in orders)
        while remaining:
            progressed = False
            for g in range(p):
                ops, q = orders[g], ptr[g]
                while q < len(ops):
                    k, m, s = ops[q]
                    if k == 0:
                        d, ready = (fi[s - 1][m], fi[s - 1][m] > 0) if s > 0 else (0, True)
                    elif k == 1:
                        d = bi[s + 1][m] if s < S - 1 else fi[s][m]
                        ready = d > 0
                    else:
                        d = bi[s][m]
                        ready = d > 0
                    if not ready:
                        break
                    prog.append((d, last[g], k * S + s))
                    meta.append((k, m, s, g))
                    last[g] = len(prog)
                    idx[k][s][m] = len(prog)
                    q += 1
                if q != ptr[g]:
                    progressed = True
                    remaining -= q - ptr[g]
                    ptr[g] = q
            if not progressed:  # pragma: no cover - the schedules never deadlock
                raise RuntimeError(f"schedule {schedule} deadlocked")
        _PROGRAMS[key] = (prog, meta, last)
    return _PROGRAMS[key]


def _run(forward: Sequence[float], backward: Sequence[float], weight: Sequence[float] | None, schedule: str,
         microbatches: int, virtual: int) -> tuple[list[float], tuple]:
    """Every op's end time (1-based as in ``_program``; ``t[0] = 0``) and the program. Each op
    starts at the later of its data's arrival and its group's previous op's end. With ``weight``
    (zb) B takes backward - weight, W weight."""
    S = len(forward)
    program = _program(schedule, S, microbatches, virtual)
    bdur = [b - w for b, w in zip(backward, weight)] if weight is not None else list(backward)
    dur = [*forward, *bdur, *(weight if weight is not None else [0.0] * S)]
    t = [0.0]
    app = t.append
    for a, b, c in program[0]:
        x = t[a]
        y = t[b]
        app((x if x > y else y) + dur[c])
    return t, program


def _ends(t: list[float], program: tuple, stages: int, microbatches: int) -> list[list[list[float]]]:
    """Each stage's op ends [F ends, B ends, W ends] per microbatch (-1 where no such op)."""
    ends = [[[-1.0] * microbatches for _ in range(stages)] for _ in range(3)]
    for i, (k, m, s, _g) in enumerate(program[1], 1):
        ends[k][s][m] = t[i]
    return ends


def _op_events(t: list[float], program: tuple) -> list[Event]:
    """The ops as Events (start: the later of the data's arrival and the group's previous end)."""
    out = []
    for i, ((a, b, _c), (k, m, s, g)) in enumerate(zip(program[0], program[1]), 1):
        x = t[a]
        y = t[b]
        out.append(Event(s, "FBW"[k], m, x if x > y else y, t[i], g))
    return out


def _sweep(forward: Sequence[float], backward: Sequence[float], weight: Sequence[float] | None, schedule: str,
           microbatches: int, virtual: int, events: list | None) -> tuple[list[float], list[list[float]] | None]:
    """Greedy sweep over the groups' op lists; returns each group's end and (with ``events``, which
    gets every op appended) each stage's op ends [F ends, B ends, W ends] per microbatch."""
    t, program = _run(forward, backward, weight, schedule, microbatches, virtual)
    free = [t[i] for i in program[2]]
    if events is None:
        return free, None
    events.extend(_op_events(t, program))
    return free, _ends(t, program, len(forward), microbatches)


def simulate_times(forward: list[float], backward: list[float], schedule: str, microbatches: int,
                   virtual: int = 1, weight: list[float] | None = None) -> tuple[float, list[Event]]:
    """Pipeline makespan and events for per-stage op durations (no all-reduce). ``weight`` (zb
    only): each stage's W seconds, included in ``backward``; no W at all when None."""
    events: list[Event] = []
    if schedule == "zb" and weight is None:
        weight = [0.0] * len(forward)
    free, _ = _sweep(forward, backward, weight if schedule == "zb" else None, schedule, microbatches, virtual, events)
    return (max(free) if free else 0.0), events


def makespan(forward: list[float], backward: list[float], schedule: str, microbatches: int, virtual: int = 1,
             weight: list[float] | None = None) -> float:
    """``simulate_times(...)[0]`` without the events, for the search's local moves, which simulate
    hundreds of boundary variants (tests check equality)."""
    if schedule == "zb" and weight is None:
        weight = [0.0] * len(forward)
    free, _ = _sweep(forward, backward, weight if schedule == "zb" else None, schedule, microbatches, virtual, None)
    return max(free) if free else 0.0


def last_gradient_ends(ends: list[list[list[float]]], schedule: str) -> list[float]:
    """Per stage: when its last gradient-producing op (last B, last W with zb) ends."""
    k = 2 if schedule == "zb" else 1
    return [max(row) for row in ends[k]]


def step_with_allreduce(pipe: float, last_end: list[float], costs: Sequence[StageCost], groups: int,
                        overlap: bool, events: list | None = None) -> float:
    """Step end once every stage's all-reduce is done. A group's all-reduces (one per chunk) run
    one after another on its links. Without overlap they start at the drain; with overlap stage s's
    starts ``total - exposed`` before its last gradient op ends (the hidden part), so it ends
    ``exposed`` after that op, or later when the group's link is still busy."""
    step = pipe
    link_free = [0.0] * groups
    for s in sorted(range(len(costs)), key=lambda i: last_end[i]):
        c = costs[s]
        if c.allreduce_total <= 0:
            continue
        g = s % groups
        ready = last_end[s] - (c.allreduce_total - c.allreduce) if overlap else pipe
        st = max(ready, link_free[g])
        link_free[g] = st + c.allreduce_total
        step = max(step, link_free[g])
        if events is not None:
            events.append(Event(s, "AR", -1, st, link_free[g], g))
    return step


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
            union = list(dict.fromkeys(tuple(d) for j in sorted(holders) for d in stages[j][3]))  # chunks share GPUs
            t += cm.allreduce(nbytes, len(union), allreduce_link(union))
        out.append(t)
    return out


def group_memory(costs: Sequence[StageCost], groups: int) -> list[float]:
    """Peak bytes per GPU of each stage's group: its chunks' memories added, the working peak once."""
    per = [0.0] * groups
    peak = [0.0] * groups
    for s, c in enumerate(costs):
        per[s % groups] += c.memory - c.work_peak
        peak[s % groups] = max(peak[s % groups], c.work_peak)
    return [per[s % groups] + peak[s % groups] for s in range(len(costs))]


def simulate(plan: Plan, cm: CostModel) -> Simulation:
    """Simulate one training step of ``plan`` under the cost model."""
    costs = stage_costs(plan, cm)
    searched = objective(plan.schedule, plan.microbatches, costs)
    full = allreduce_times(cm, [(st.start, st.end, st.replicas, st.devices) for st in plan.stages])
    bucket = bucket_bytes()
    gather = 1.5 if plan.zero else 1.0  # ZeRO-1: the parameter all-gather after the step (costmodel.exposed_allreduce)
    costs = [replace(c, allreduce_total=gather * a, allreduce=exposed_allreduce(
        a, c.grad_seconds, float(cm.range_info(st.start, st.end).trainable_bytes), plan.zero, plan.allreduce_overlap,
        bucket)) for c, a, st in zip(costs, full, plan.stages)]
    p, v, M = plan.groups, plan.virtual_stages, plan.microbatches
    zb = plan.schedule == "zb"
    t, program = _run([c.forward for c in costs], [c.backward for c in costs], [c.weight for c in costs] if zb else None,
                      plan.schedule, M, v)
    free = [t[i] for i in program[2]]
    pipe = max(free) if free else 0.0
    last_end = last_gradient_ends(_ends(t, program, len(costs), M), plan.schedule)
    step = step_with_allreduce(pipe, last_end, costs, p, plan.allreduce_overlap)

    def events() -> list[Event]:  # the same sweep's ops, then the same all-reduce pass with events
        out = _op_events(t, program)
        step_with_allreduce(pipe, last_end, costs, p, plan.allreduce_overlap, out)
        return out
    held = held_per_stage(plan)
    memory = group_memory(costs, p)
    group_busy = [0.0] * p
    for s, c in enumerate(costs):
        group_busy[s % p] += M * (c.forward + c.backward) + c.allreduce_total
    busy = [group_busy[s % p] for s in range(len(costs))]
    if plan.schedule not in SCHEDULES:  # interleaved / zb: no closed form, the simulation is their price
        searched = step
    return Simulation(step, pipe, searched, costs, memory, held, busy, events, cm.capacity)
