"""The plans a user would otherwise pick, priced with the same cost model and simulator.

    notes = {}
    results = evaluate_baselines(cost_model, [1, 2, 4], forced, notes)   # {name: Baseline(plan, simulation) or None}
    notes["data-parallel"]     # why it is None: 'not applicable with --stages 3' or 'infeasible (does not fit)'

- ``data-parallel``: one stage on every GPU (gradient accumulation over M microbatches), if it fits;
- ``uniform``: S stages with equal block counts (DeepSpeed ``partition_method='uniform'``);
- ``parameters``: S stages balancing parameter bytes (DeepSpeed's default ``'parameters'``);
- ``time``: S stages balancing forward+backward time (torchgpipe ``balance_by_time``).

Each is priced the way the tool it stands for runs: ``data-parallel`` is PyTorch DDP, which
all-reduces gradient buckets while the backward still runs (``allreduce_overlap``, only the
exposed part charged, as for rannc's plans); the pipelines (DeepSpeed's PipelineModule,
torchgpipe) all-reduce after the pipeline drains (no overlap), 1F1B. ZeRO-1 is an option where
the tool has it: DDP with torch's ZeroRedundancyOptimizer, DeepSpeed's pipeline engine (which
takes ZeRO stage 1, not 2 or 3) for ``uniform`` and ``parameters``; torchgpipe has none.
Every stage gets the same replica count ``GPUs / S`` (laid out contiguously); checkpointing is
switched on for a stage only when it does not fit otherwise. Each heuristic gets its best S and M
(by the objective, then the simulator among the three best), which is generous to the baselines.
Forced parts narrow them as they narrow the search: a forced stage count is the only S tried
(data-parallel is then not applicable unless it is 1), a forced checkpoint setting holds on every
stage; a baseline with no configuration left says why (``notes``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rannc_cli.planner.costmodel import CostModel, in_flight
from rannc_cli.planner.placement import allreduce_link, contiguous, link_in
from rannc_cli.planner.plan import Plan, StagePlan, plan_objective
from rannc_cli.planner.simulate import Simulation, simulate

NAMES = ("data-parallel", "uniform", "parameters", "time")


@dataclass
class Baseline:
    name: str
    plan: Plan
    simulation: Simulation


def balanced_split(weights: list[float], parts: int) -> list[int]:
    """Boundaries [0, ..., n] of ``parts`` non-empty contiguous groups minimising the largest group sum."""
    n = len(weights)
    cs = np.concatenate([[0.0], np.cumsum(np.asarray(weights, dtype=float))])
    best = np.full((parts + 1, n + 1), np.inf)
    arg = np.zeros((parts + 1, n + 1), dtype=int)
    best[0, 0] = 0.0
    for p in range(1, parts + 1):
        for e in range(p, n + 1):
            a = np.arange(p - 1, e)
            vals = np.maximum(best[p - 1, a], cs[e] - cs[a])
            i = int(np.argmin(vals))
            best[p, e], arg[p, e] = vals[i], a[i]
    bounds = [n]
    for p in range(parts, 0, -1):
        bounds.append(int(arg[p, bounds[-1]]))
    return bounds[::-1]


def _weights(cm: CostModel, how: str) -> list[float]:
    prof = cm.profile
    if how == "parameters":
        return [float(sum(prof.parameters[p].bytes for p in b.params)) for b in prof.blocks]
    fwd, bwd, _, _, _ = cm.block_arrays(max(1, cm.microbatch(1)))
    return [float(f + b) for f, b in zip(fwd, bwd)]


ZERO_TOOLS = ("data-parallel", "uniform", "parameters")  # baselines whose tool offers ZeRO-1


def _plan(cm: CostModel, bounds: list[int], replicas: int, m: int, checkpoint: str | None = None,
          overlap: bool = False, zero: int = 0) -> Plan | None:
    cl = cm.cluster
    layout = contiguous([replicas] * (len(bounds) - 1), cl.gpus_per_node, cl.devices)
    if layout is None:
        return None
    stages = []
    prev = None
    n = len(bounds) - 1
    for i in range(n):
        c = cm.best_stage_cost(bounds[i], bounds[i + 1], replicas, m, link_in(prev, layout[i]), allreduce_link(layout[i]),
                               in_flight("1f1b", m, n, i), checkpoint, zero=zero, overlap=overlap)
        if not c.feasible:
            return None
        stages.append(StagePlan(bounds[i], bounds[i + 1], replicas, layout[i], c.checkpoint))
        prev = layout[i]
    return Plan("1f1b", m, cm.batch_size, stages, allreduce_overlap=overlap, zero=zero)


def evaluate_baselines(cm: CostModel, microbatches: list[int], forced=None,
                       notes: dict[str, str] | None = None) -> dict[str, Baseline | None]:
    """Best configuration of each heuristic, or None where no configuration fits or applies (the
    reason goes to ``notes[name]`` when given)."""
    n, total = cm.n, cm.cluster.devices
    forced_stages = forced.stages if forced is not None else None
    checkpoint = forced.checkpoint if forced is not None else None
    out: dict[str, Baseline | None] = {}
    notes = {} if notes is None else notes
    for name in NAMES:
        options: list[tuple[float, Plan]] = []
        stage_counts = [1] if name == "data-parallel" else [s for s in range(2, min(n, total) + 1) if total % s == 0]
        why = ""
        if forced_stages is not None:
            if forced_stages not in stage_counts:
                why = (f"not applicable: {forced_stages} stages of equal replica counts do not fill {total} GPUs"
                       if name != "data-parallel" and total % forced_stages
                       else f"not applicable with --stages {forced_stages}")
            stage_counts = [s for s in stage_counts if s == forced_stages]
        elif not stage_counts:
            why = f"not applicable: {n} block(s) on {total} GPU(s) leave no stage count of 2 or more"
        weights = None if name in ("data-parallel", "uniform") else _weights(cm, name)
        small = 0
        for s in stage_counts:
            if name == "data-parallel":
                bounds = [0, n]
            elif name == "uniform":
                bounds = [round(i * n / s) for i in range(s + 1)]
            else:
                bounds = balanced_split(weights, s)  # type: ignore[arg-type]
            r = total // s
            for m in microbatches:
                if r > cm.microbatch(m):
                    small += 1
                    continue
                zeros = [0, 1] if name in ZERO_TOOLS and r > 1 else [0]
                if forced is not None and forced.zero is not None:
                    zeros = [forced.zero] if forced.zero in zeros or forced.zero == 0 else []
                for zero in zeros:
                    plan = _plan(cm, bounds, r, m, checkpoint, overlap=name == "data-parallel", zero=zero)
                    if plan is not None:
                        options.append((plan_objective(plan, cm), plan))
        options.sort(key=lambda x: x[0])
        sims = [(simulate(p, cm), p) for _, p in options[:3]]
        if sims:
            sim, plan = min(sims, key=lambda x: x[0].step_seconds)
            out[name] = Baseline(name, plan, sim)
        else:
            out[name] = None
            if not why and small == len(stage_counts) * len(microbatches):
                why = (f"not applicable: a batch of {cm.batch_size} cannot give every one of the "
                       f"{total // max(stage_counts)} or more replicas per stage a sample")
            notes[name] = why or "infeasible (does not fit)"
    return out
