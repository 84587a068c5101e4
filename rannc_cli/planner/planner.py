"""`rannc plan` as a library call: search, simulate, compare with the baselines.

    report = make_plan(profile, ClusterSpec.from_flags(4, 8, "16GiB"), batch_size=256)
    report.plan, report.simulation.step_seconds, report.baselines["time"].simulation.step_seconds

The search (search.py, or exhaustive.py) finds the exact optimum of the objective over coarsened
units and keeps its runners-up; refine.py re-places the boundaries of the best structures (and of
their two-way splits) exactly over the blocks; the 12 best by objective are simulated
(simulate.py), the best three structures are polished under the simulator, and the plan with the
shortest simulated step is chosen. If a baseline still simulates faster, that plan is returned
instead and the report says so. Forced parts (stages, replicas, microbatches, schedule,
checkpointing, all devices) become one forced.Forced that every step respects; the rest is still
searched, and the returned plan honours them and passes the runtime's acceptance check
(redistribution.py), or a RanncError names the part that cannot hold. When nothing fits, one RanncError says how much memory the model needs,
which block cannot fit one GPU (if any) and the smallest cluster that would fit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

from rannc_cli.errors import RanncError
from rannc_cli.planner.baselines import Baseline, evaluate_baselines
from rannc_cli.planner.cluster import ClusterSpec
from rannc_cli.planner.coarsen import coarsen
from rannc_cli.planner.costmodel import TIE_WEIGHT, CostModel, rank_seconds
from rannc_cli.planner.forced import Forced
from rannc_cli.planner.exhaustive import MAX_UNITS, exhaustive_ranked
from rannc_cli.planner.placement import devices
from rannc_cli.planner.plan import Plan, StagePlan
from rannc_cli.planner.redistribution import check_plan_runs
from rannc_cli.planner.refine import Refiner
from rannc_cli.planner.search import Candidate, SearchSpace, min_devices, search
from rannc_cli.planner.simulate import Simulation, simulate
from rannc_cli.planner.variants import STRUCTURES, schedule_variants
from rannc_cli.profiler.format import Profile

GIB = float(1 << 30)
POLISH_STRUCTURES = 3  # distinct structures (replicas, placement, M) whose boundaries the simulator polishes
REFINE_UNITS = 192  # boundary refinement runs over the blocks themselves up to this many (else coarsened to it)


@dataclass
class PlanReport:
    plan: Plan
    simulation: Simulation
    cost_model: CostModel
    baselines: dict[str, Baseline | None]
    alternatives: list[tuple[Plan, Simulation]] = field(default_factory=list)
    search_seconds: float = 0.0
    units: int = 0
    dp_calls: int = 0
    exhaustive_plans: int | None = None
    chosen_from: str = "search"  # or "baseline NAME" when a baseline simulated faster than every searched plan
    search_step_seconds: float = 0.0  # simulated step of the search's own best plan
    optimality_gap: float = 0.0  # > 0 when the DP-run budget stopped the search: objective within this fraction
    baseline_notes: dict[str, str] = field(default_factory=dict)  # why a baseline is None: not applicable / no fit
    forced_flags: str = ""  # the forced parts, as flags (for --explain)


def candidate_plan(c: Candidate, cm: CostModel) -> Plan:
    g = cm.cluster.gpus_per_node
    stages = [StagePlan(a, e, r, devices(s, r, g), ck) for a, e, r, s, ck in c.stages]
    return Plan(c.schedule, c.microbatches, cm.batch_size, stages, virtual_stages=c.virtual, zero=c.zero,
                allreduce_overlap=c.overlap)


def plan_candidate(plan: Plan, cm: CostModel, objective: float) -> Candidate:
    return Candidate(objective, plan.schedule, plan.microbatches,
                     tuple((s.start, s.end, s.replicas, s.devices[0][0] * cm.cluster.gpus_per_node + s.devices[0][1],
                            s.checkpoint) for s in plan.stages), plan.virtual_stages, plan.zero, plan.allreduce_overlap)


def annotate(plan: Plan, sim: Simulation, cm: CostModel, profile: Profile) -> Plan:
    """Record the profile hash, cluster fingerprint and predictions in the plan."""
    plan.profile_hash = profile.content_hash()
    plan.graph_hash = str(profile.model.get("graph_hash", ""))
    plan.cluster_fingerprint = cm.cluster.fingerprint
    plan.model = str(profile.model.get("name", ""))
    plan.cluster = {"nodes": cm.cluster.nodes, "gpus_per_node": cm.cluster.gpus_per_node,
                    "memory_per_gpu": cm.cluster.memory_per_gpu, "gpu_model": cm.cluster.gpu_model}
    plan.predicted = {
        "step_seconds": sim.step_seconds,
        "samples_per_second": cm.batch_size / sim.step_seconds if sim.step_seconds > 0 else math.inf,
        "objective_seconds": sim.objective_seconds,
        "pipeline_seconds": sim.pipeline_seconds,
        "memory_margin": cm.margin,
        "optimizer_state_factor": cm.opt_factor,
        "stages": [{"memory_bytes": int(m), "forward_seconds": c.forward, "backward_seconds": c.backward,
                    "allreduce_seconds": c.allreduce, "allreduce_total_seconds": c.allreduce_total, "shard": c.shard}
                   for m, c in zip(sim.memory, sim.costs)],
    }
    return plan


def rank_key(plan: Plan, sim: Simulation, tie: float = TIE_WEIGHT) -> tuple[float, float]:
    """How final candidates are ranked: simulated step (with the one-microbatch tie-break toward
    time-balanced stages, costmodel.rank_seconds), then the objective."""
    return (rank_seconds(sim.step_seconds, [c.forward for c in sim.costs], [c.backward for c in sim.costs],
                         plan.microbatches, tie), sim.objective_seconds)


def make_plan(profile: Profile, cluster: ClusterSpec, batch_size: int | None = None, stages: int | None = None,
              replicas: list[int] | None = None, microbatches: int | None = None, schedule: str | None = None,
              use_exhaustive: bool = False, max_units: int | None = None, with_baselines: bool = True,
              keep: int = 12, checkpoint: str | None = None, all_devices: bool = False,
              virtual_stages: int | None = None, zero: int | None = None) -> PlanReport:
    """Search the fastest plan of ``profile`` on ``cluster`` (see the module doc).

    Forced parts (``stages``, ``replicas``, ``microbatches``, ``schedule``, ``checkpoint`` 'on'/'off',
    ``all_devices``) become one ``Forced`` that every step respects; the returned plan honours all of
    them and passes the runtime's acceptance check (redistribution.py), or a RanncError says why not.
    """
    forced = Forced(stages, tuple(replicas) if replicas else None, microbatches, schedule, checkpoint, all_devices,
                    virtual_stages, zero)
    cm = CostModel(profile, cluster, batch_size)
    forced.conflicts(cm)
    try:
        return _make_plan(profile, cm, forced, use_exhaustive, max_units, with_baselines, keep)
    except _NoPlan as exc:
        if not forced.all_devices:
            raise exc.error from None
    # no plan keeps every GPU busy: the best plan that fits, saying why GPUs stay idle
    try:
        report = _make_plan(profile, cm, replace(forced, all_devices=False), use_exhaustive, max_units, with_baselines,
                            keep)
    except _NoPlan as exc:
        raise exc.error from None
    report.plan.predicted["idle_reason"] = idle_reason(cm, report.plan, exhausted=True)
    return report


class _NoPlan(Exception):
    def __init__(self, error: RanncError):
        self.error = error


def idle_reason(cm: CostModel, plan: Plan, exhausted: bool = False) -> str:
    """One line on why ``plan`` leaves GPUs of the cluster idle ('' when it uses them all)."""
    used, total = plan.devices_used, cm.cluster.devices
    if used >= total:
        return ""
    widest = cm.microbatch(1)
    if widest * cm.n < total:
        why = f"a batch of {cm.batch_size} feeds at most {widest} replicas per stage over {cm.n} blocks"
    elif exhausted:
        why = f"no plan using all {total} fits in memory or keeps the forced parts"
    else:
        why = f"every plan of the search space on all {total} is predicted slower (more replicas cost more " \
              "all-reduce and smaller shards than they save) or does not fit"
    return f"uses {used} of {total} GPUs: {why}"


def _make_plan(profile: Profile, cm: CostModel, forced: Forced, use_exhaustive: bool, max_units: int | None,
               with_baselines: bool, keep: int) -> PlanReport:
    from rannc_cli.config import settings

    stages = forced.stages
    units_cap = int(max_units or settings.get("planner_max_units"))
    if use_exhaustive:
        units_cap = min(units_cap, MAX_UNITS)
    if stages is not None and stages > len(profile.blocks):
        raise RanncError(f"--stages {stages} exceeds the profile's {len(profile.blocks)} blocks",
                         hint=f"use at most {len(profile.blocks)} stages")
    units_cap = max(units_cap, stages or 1)
    bounds = coarsen(cm, units_cap)
    space = SearchSpace.from_forced(cm, forced)
    if stages is not None and stages > len(bounds) - 1:
        raise RanncError(f"--stages {stages} exceeds the {len(bounds) - 1} units left after coarsening",
                         hint="raise RANNC_PLANNER_MAX_UNITS")
    t0 = time.perf_counter()
    count = None
    gap = 0.0
    if use_exhaustive:
        cands, count = exhaustive_ranked(cm, bounds, space, all_schedules=forced.schedule is None,
                                         keep=max(keep, STRUCTURES))
        calls = 0
    else:
        result = search(cm, bounds, space)
        cands, calls = result.candidates, result.dp_calls
        if not result.exact and result.best is not None:
            gap = result.best.objective / result.lower_bound - 1 if result.lower_bound > 0 else math.inf
    refiner = Refiner(cm, coarsen(cm, REFINE_UNITS), forced) if cands else None
    if refiner is not None and not use_exhaustive and len(refiner.bounds) > len(bounds):
        cands = refiner.refine_all(cands)  # the search ran on coarsened units: re-place boundaries finely
    if not cands:
        raise _NoPlan(infeasible(cm, bounds, space, forced=forced.shapes_plan))
    sims = []
    for c in cands[:keep]:
        plan = candidate_plan(c, cm)
        sims.append((plan, simulate(plan, cm)))
    sims.sort(key=lambda ps: rank_key(*ps, forced.tie))
    if refiner is not None and not use_exhaustive:  # the simulator's last word on the boundaries of the best few structures
        polished: set[tuple] = set()
        for plan, sim in list(sims):
            key = (plan.schedule, plan.microbatches, tuple((st.replicas, st.devices[0]) for st in plan.stages), plan.zero)
            if key in polished:
                continue
            polished.add(key)
            c = plan_candidate(plan, cm, sim.objective_seconds)
            got = refiner.polish(c)
            if got is not None and got[1] < rank_key(plan, sim, forced.tie)[0] * (1 - 1e-12):
                better = candidate_plan(got[0], cm)
                sims.append((better, simulate(better, cm)))
            if len(polished) >= POLISH_STRUCTURES:
                break
        sims.sort(key=lambda ps: rank_key(*ps, forced.tie))
    if refiner is not None:  # interleaved and zb: the best structures re-ranked under those schedules (variants.py)
        sims += schedule_variants(cm, refiner, sims, forced, space.microbatches)
        sims.sort(key=lambda ps: rank_key(*ps, forced.tie))
        calls += refiner.calls
    elapsed = time.perf_counter() - t0
    sims = [ps for ps in sims if acceptable(ps[0], cm, forced)]  # a guard: the search already keeps to both
    if not sims:
        raise _NoPlan(RanncError(f"no plan found that keeps {forced.flags() or 'the planner rules'} and that the "
                                 "runtime can run", hint="drop some forced settings"))
    notes: dict[str, str] = {}
    base = evaluate_baselines(cm, space.microbatches if forced.microbatches else SearchSpace.build(cm).microbatches,
                              forced, notes) if with_baselines else {}
    searched = sims[0][1].step_seconds
    chosen_from = "search"
    feasible_base = {k: b for k, b in base.items() if b is not None and acceptable(b.plan, cm, forced)}
    if not forced.shapes_plan and not use_exhaustive and feasible_base:  # never return a plan slower than a baseline
        name, b = min(feasible_base.items(), key=lambda kv: rank_key(kv[1].plan, kv[1].simulation, forced.tie))
        if rank_key(b.plan, b.simulation, forced.tie) < rank_key(*sims[0], forced.tie):
            sims.insert(0, (Plan(b.plan.schedule, b.plan.microbatches, b.plan.batch_size,
                                 [StagePlan(s.start, s.end, s.replicas, list(s.devices), s.checkpoint)
                                  for s in b.plan.stages], virtual_stages=b.plan.virtual_stages, zero=b.plan.zero,
                                 allreduce_overlap=b.plan.allreduce_overlap), b.simulation))
            chosen_from = f"baseline {name}"
    plan, sim = sims[0]
    annotate(plan, sim, cm, profile)
    plan.predicted["chosen_from"] = chosen_from
    plan.predicted["search_step_seconds"] = searched
    plan.predicted["optimality_gap"] = gap
    if plan.devices_used < cm.cluster.devices:
        plan.predicted["idle_reason"] = idle_reason(cm, plan)
    report = PlanReport(plan, sim, cm, base, sims[1:], elapsed, len(bounds) - 1, calls, count, chosen_from, searched,
                        gap)
    report.baseline_notes = notes
    report.forced_flags = forced.flags()
    return report


def acceptable(plan: Plan, cm: CostModel, forced: Forced) -> bool:
    """Whether ``plan`` honours every forced part and passes the runtime's acceptance check."""
    if forced.violations(plan, cm.cluster.devices):
        return False
    try:
        check_plan_runs(cm.profile, plan)
    except RanncError:
        return False
    return True


def infeasible(cm: CostModel, bounds: list[int], space: SearchSpace, forced: bool) -> RanncError:
    """One clear error: memory needed, the block too big for one GPU, the smallest cluster that fits."""
    cl = cm.cluster
    cap = cm.capacity
    static = cm.total_static_memory()
    parts = [f"no plan fits {cl.describe()} ({cap / GIB:.3g} GiB usable per GPU after the "
             f"{cm.margin:.0%} margin): parameters, gradients and optimizer state alone need {static / GIB:.3g} GiB"]
    too_big = [(cm.min_block_memory(b), b) for b in range(cm.n)]
    worst_mem, worst = max(too_big)
    if worst_mem > cap:
        blk = cm.profile.blocks[worst]
        parts.append(f"block {worst} ({blk.name or '<root>'}, {blk.module_type}) needs {worst_mem / GIB:.3g} GiB on one GPU "
                     f"even with one sample and checkpointing, so no number of these GPUs is enough")
        hint = "use GPUs with more memory, a smaller batch or model, or a lower optimizer_state_factor"
    else:
        big = ClusterSpec(4096, cl.gpus_per_node, cl.memory_per_gpu, cl.links, cl.gpu_model, cl.source)
        big_cm = CostModel(cm.profile, big, cm.batch_size, cm.margin, cm.opt_factor)
        big_space = SearchSpace.build(big_cm, schedules=space.schedules, microbatches=space.microbatches,
                                      stages=space.stages, replicas=space.forced_replicas, zero=space.zero)
        need = min_devices(big_cm, bounds, big_space)
        if need is None:
            parts.append("no cluster of these GPUs fits this batch with these forced settings")
            hint = "drop forced --stages/--replicas/--microbatches, or use GPUs with more memory"
        else:
            nodes = smallest_nodes(cm, bounds, space, -(-need // cl.gpus_per_node))
            if nodes is None:
                parts.append(f"it needs at least {need} GPUs of this kind (about {-(-need // cl.gpus_per_node)} nodes)")
            else:
                parts.append(f"the smallest cluster that fits is {nodes} node(s) x {cl.gpus_per_node} GPUs")
            hint = "plan for more nodes (--nodes)" + (", or drop the forced settings" if forced else "")
    return RanncError("; ".join(parts), hint=hint)


def smallest_nodes(cm: CostModel, bounds: list[int], space: SearchSpace, start: int, tries: int = 4,
                   max_devices: int = 512) -> int | None:
    """First node count from ``start`` on where a real search finds a plan (None if too large to check)."""
    from rannc_cli.planner.search import feasible

    cl = cm.cluster
    for nodes in range(max(start, cl.nodes + 1), max(start, cl.nodes + 1) + tries):
        if nodes * cl.gpus_per_node > max_devices:
            return None
        sub = CostModel(cm.profile, cl.with_nodes(nodes), cm.batch_size, cm.margin, cm.opt_factor)
        sp = SearchSpace.build(sub, schedules=space.schedules, microbatches=space.microbatches, stages=space.stages,
                               replicas=space.forced_replicas, zero=space.zero)
        if feasible(sub, bounds, sp):
            return nodes
    return None
