"""`rannc plan` as a library call: search, simulate, compare with the baselines.

    report = make_plan(profile, ClusterSpec.from_flags(4, 8, "16GiB"), batch_size=256)
    report.plan, report.simulation.step_seconds, report.baselines["time"].simulation.step_seconds

The search (search.py, or exhaustive.py) finds the exact optimum of the objective over coarsened
units and keeps its runners-up; refine.py re-places the boundaries of the best structures (and of
their two-way splits) exactly over the blocks; the 12 best by objective are simulated
(simulate.py), the best three structures are polished under the simulator, and the plan with the
shortest simulated step is chosen. If a baseline still simulates faster, that plan is returned
instead and the report says so. Forced parts (stages, replicas, microbatches, schedule) narrow the space; the
rest is still searched. When nothing fits, one RanncError says how much memory the model needs,
which block cannot fit one GPU (if any) and the smallest cluster that would fit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from rannc_cli.errors import RanncError
from rannc_cli.planner.baselines import Baseline, evaluate_baselines
from rannc_cli.planner.cluster import ClusterSpec
from rannc_cli.planner.coarsen import coarsen
from rannc_cli.planner.costmodel import CostModel
from rannc_cli.planner.exhaustive import MAX_UNITS, exhaustive
from rannc_cli.planner.placement import devices
from rannc_cli.planner.plan import Plan, StagePlan
from rannc_cli.planner.refine import Refiner
from rannc_cli.planner.search import Candidate, SearchSpace, min_devices, search
from rannc_cli.planner.simulate import Simulation, simulate
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


def candidate_plan(c: Candidate, cm: CostModel) -> Plan:
    g = cm.cluster.gpus_per_node
    stages = [StagePlan(a, e, r, devices(s, r, g), ck) for a, e, r, s, ck in c.stages]
    return Plan(c.schedule, c.microbatches, cm.batch_size, stages)


def plan_candidate(plan: Plan, cm: CostModel, objective: float) -> Candidate:
    return Candidate(objective, plan.schedule, plan.microbatches,
                     tuple((s.start, s.end, s.replicas, s.devices[0][0] * cm.cluster.gpus_per_node + s.devices[0][1],
                            s.checkpoint) for s in plan.stages))


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
                    "allreduce_seconds": c.allreduce, "shard": c.shard} for m, c in zip(sim.memory, sim.costs)],
    }
    return plan


def make_plan(profile: Profile, cluster: ClusterSpec, batch_size: int | None = None, stages: int | None = None,
              replicas: list[int] | None = None, microbatches: int | None = None, schedule: str | None = None,
              use_exhaustive: bool = False, max_units: int | None = None, with_baselines: bool = True,
              keep: int = 12) -> PlanReport:
    """Search the fastest plan of ``profile`` on ``cluster`` (see the module doc)."""
    from rannc_cli.config import settings

    cm = CostModel(profile, cluster, batch_size)
    units_cap = int(max_units or settings.get("planner_max_units"))
    if use_exhaustive:
        units_cap = min(units_cap, MAX_UNITS)
    if stages is not None and stages > len(profile.blocks):
        raise RanncError(f"--stages {stages} exceeds the profile's {len(profile.blocks)} blocks")
    units_cap = max(units_cap, stages or 1)
    bounds = coarsen(cm, units_cap)
    space = SearchSpace.build(cm, schedules=[schedule] if schedule else None,
                              microbatches=[microbatches] if microbatches else None, stages=stages, replicas=replicas)
    if stages is not None and stages > len(bounds) - 1:
        raise RanncError(f"--stages {stages} exceeds the {len(bounds) - 1} units left after coarsening",
                         hint="raise RANNC_PLANNER_MAX_UNITS")
    t0 = time.perf_counter()
    count = None
    gap = 0.0
    if use_exhaustive:
        best, count = exhaustive(cm, bounds, space, all_schedules=schedule is None)
        cands = [best] if best else []
        calls = 0
    else:
        result = search(cm, bounds, space)
        cands, calls = result.candidates, result.dp_calls
        if not result.exact and result.best is not None:
            gap = result.best.objective / result.lower_bound - 1 if result.lower_bound > 0 else math.inf
    refiner = None
    if cands and not use_exhaustive:
        refiner = Refiner(cm, coarsen(cm, REFINE_UNITS))
        if len(refiner.bounds) > len(bounds):  # the search ran on coarsened units: re-place boundaries finely
            cands = refiner.refine_all(cands)
    if not cands:
        raise infeasible(cm, bounds, space, forced=bool(stages or replicas or microbatches or schedule))
    sims = []
    for c in cands[:keep]:
        plan = candidate_plan(c, cm)
        sims.append((plan, simulate(plan, cm)))
    sims.sort(key=lambda ps: (ps[1].step_seconds, ps[1].objective_seconds))
    if refiner is not None:  # the simulator's last word on the boundaries of the best few structures
        polished: set[tuple] = set()
        for plan, sim in list(sims):
            key = (plan.schedule, plan.microbatches, tuple((st.replicas, st.devices[0]) for st in plan.stages))
            if key in polished:
                continue
            polished.add(key)
            c = plan_candidate(plan, cm, sim.objective_seconds)
            got = refiner.polish(c)
            if got is not None and got[1] < sim.step_seconds * (1 - 1e-12):
                better = candidate_plan(got[0], cm)
                sims.append((better, simulate(better, cm)))
            if len(polished) >= POLISH_STRUCTURES:
                break
        sims.sort(key=lambda ps: (ps[1].step_seconds, ps[1].objective_seconds))
        calls += refiner.calls
    elapsed = time.perf_counter() - t0
    base = evaluate_baselines(cm, space.microbatches if microbatches else SearchSpace.build(cm).microbatches) \
        if with_baselines else {}
    searched = sims[0][1].step_seconds
    unforced = not (stages or replicas or microbatches or schedule or use_exhaustive)
    chosen_from = "search"
    feasible_base = {k: b for k, b in base.items() if b is not None}
    if unforced and feasible_base:  # never return a plan slower than a baseline
        name, b = min(feasible_base.items(), key=lambda kv: kv[1].simulation.step_seconds)
        if b.simulation.step_seconds < sims[0][1].step_seconds:
            sims.insert(0, (Plan(b.plan.schedule, b.plan.microbatches, b.plan.batch_size,
                                 [StagePlan(s.start, s.end, s.replicas, list(s.devices), s.checkpoint)
                                  for s in b.plan.stages]), b.simulation))
            chosen_from = f"baseline {name}"
    plan, sim = sims[0]
    annotate(plan, sim, cm, profile)
    plan.predicted["chosen_from"] = chosen_from
    plan.predicted["search_step_seconds"] = searched
    plan.predicted["optimality_gap"] = gap
    return PlanReport(plan, sim, cm, base, sims[1:], elapsed, len(bounds) - 1, calls, count, chosen_from, searched, gap)


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
                                      stages=space.stages, replicas=space.forced_replicas)
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
                               replicas=space.forced_replicas)
        if feasible(sub, bounds, sp):
            return nodes
    return None
