"""Why the chosen plan won: the next-best alternatives and what made each slower.

    for line in explain(report): print(line)

Each alternative (the search's runners-up, then the baselines) is compared with the chosen plan
term by term: fill and drain (sum of per-microbatch stage times), steady state ((M-1) x the
bottleneck stage), gradient all-reduce; the term that grew most is named as the reason, with the
stage count, microbatch count and bottleneck stage that differ.
"""

from __future__ import annotations

from rannc_cli.planner.plan import Plan
from rannc_cli.planner.simulate import Simulation


def terms(plan: Plan, sim: Simulation) -> dict[str, float]:
    costs = sim.costs
    per_mb = [c.forward + c.backward for c in costs]
    return {"fill and drain": sum(per_mb), "steady state": (plan.microbatches - 1) * max(per_mb),
            "all-reduce": max(c.allreduce for c in costs), "p2p": sum(c.p2p_forward + c.p2p_backward for c in costs)}


def describe(plan: Plan) -> str:
    reps = ",".join(str(s.replicas) for s in plan.stages)
    ck = sum(s.checkpoint for s in plan.stages)
    return (f"{len(plan.stages)} stage(s), replicas {reps}, {plan.microbatches} microbatches, {plan.schedule}"
            + (f", {ck} checkpointed" if ck else ""))


def reason(chosen: tuple[Plan, Simulation], other: tuple[Plan, Simulation]) -> str:
    a, b = terms(*chosen), terms(*other)
    diffs = {k: b[k] - a[k] for k in ("fill and drain", "steady state", "all-reduce")}
    worst = max(diffs, key=lambda k: diffs[k])
    plan, sim = other
    bott = max(range(len(sim.costs)), key=lambda i: sim.costs[i].forward + sim.costs[i].backward)
    extra = ""
    if worst == "steady state":
        c = sim.costs[bott]
        extra = f" (bottleneck stage {bott}: {1e3 * (c.forward + c.backward):.3g} ms per microbatch)"
    elif worst == "all-reduce":
        extra = f" ({1e3 * b['all-reduce']:.3g} ms vs {1e3 * a['all-reduce']:.3g} ms)"
    elif worst == "fill and drain":
        extra = f" ({len(plan.stages)} stages, {1e3 * b['fill and drain']:.3g} ms per microbatch through the pipeline)"
    return f"{worst} +{1e3 * diffs[worst]:.3g} ms{extra}"


def explain(report, limit: int = 5) -> list[str]:
    chosen = (report.plan, report.simulation)
    step = report.simulation.step_seconds
    lines = [f"chosen: {describe(report.plan)}: {1e3 * step:.4g} ms per step"]
    shown = 0
    for plan, sim in report.alternatives:
        if shown >= limit:
            break
        ratio = sim.step_seconds / step if step else float("inf")
        lines.append(f"  alternative: {describe(plan)}: {1e3 * sim.step_seconds:.4g} ms (x{ratio:.3f}); "
                     f"lost on {reason(chosen, (plan, sim))}")
        shown += 1
    for name, base in report.baselines.items():
        if base is None:
            lines.append(f"  baseline {name}: no configuration fits in memory")
            continue
        ratio = base.simulation.step_seconds / step if step else float("inf")
        why = (f"lost on {reason(chosen, (base.plan, base.simulation))}" if ratio >= 1 else
               "faster: its stage boundaries fall inside the search's coarsened units (raise RANNC_PLANNER_MAX_UNITS)")
        lines.append(f"  baseline {name}: {describe(base.plan)}: {1e3 * base.simulation.step_seconds:.4g} ms "
                     f"(x{ratio:.3f}); {why}")
    return lines
