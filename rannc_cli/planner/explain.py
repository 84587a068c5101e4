"""Why the chosen plan won: the next-best alternatives and what made each slower.

    for line in explain(report): print(line)

Each alternative (the search's runners-up, then the baselines) is compared with the chosen plan
term by term: fill and drain (sum of per-microbatch stage times), steady state ((M-1) x the
bottleneck stage), gradient all-reduce; the term that grew most is named as the reason, with the
stage count, microbatch count and bottleneck stage that differ. ``choice_lines`` adds one line per
choice of the larger plan space: the schedule (1F1B, zb, interleaved with each v), ZeRO-1 and the
all-reduce overlap, each with the predicted step of the best plan that chose otherwise.
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
    reps = ",".join(str(s.replicas) for s in plan.stages[:plan.groups])
    ck = sum(s.checkpoint for s in plan.stages)
    return (f"{plan.groups} stage(s), replicas {reps}, {plan.microbatches} microbatches, {plan.schedule}"
            + (f" x{plan.virtual_stages} chunks" if plan.virtual_stages > 1 else "") + (", ZeRO-1" if plan.zero else "")
            + (f", {ck} checkpointed" if ck else ""))


def _schedule_name(plan: Plan) -> str:
    return f"interleaved v={plan.virtual_stages}" if plan.schedule == "interleaved" else plan.schedule


def choice_lines(report) -> list[str]:
    """One line per choice (schedule and v, ZeRO-1, all-reduce overlap): chosen or not, and the
    predicted step of the best alternative that chose otherwise."""
    from dataclasses import replace

    from rannc_cli.planner.simulate import simulate

    plan, step = report.plan, report.simulation.step_seconds
    others = [(p, s) for p, s in report.alternatives if s.fits]

    def best(pred) -> tuple[Plan, Simulation] | None:
        got = [(p, s) for p, s in others if pred(p)]
        return min(got, key=lambda ps: ps[1].step_seconds) if got else None

    def ms(sim: Simulation) -> str:
        return f"{1e3 * sim.step_seconds:.4g} ms (x{sim.step_seconds / step:.3f})" if step else "?"

    lines = []
    chosen = _schedule_name(plan)
    names = ["1f1b", "zb"] + [f"interleaved v={v}" for v in (2, 3, 4)]
    for name in names:
        if name == chosen:
            continue
        alt = best(lambda p, n=name: _schedule_name(p) == n)
        flags = getattr(report, "forced_flags", "")
        why = (f"not chosen: its best plan ({describe(alt[0])}) predicts {ms(alt[1])}" if alt is not None else
               f"not priced ({'ruled out by ' + flags + ', or ' if flags else ''}too few blocks for p v chunks, "
               "or no such plan fits)")
        lines.append(f"  schedule {name}: {why}")
    lines.insert(0, f"  schedule {chosen}: chosen ({1e3 * step:.4g} ms)")
    alt = best(lambda p: p.zero != plan.zero)
    state = "on" if plan.zero else "off"
    lines.append(f"  ZeRO-1 {state}: " + (f"the best plan with ZeRO-1 {'off' if plan.zero else 'on'} predicts {ms(alt[1])}"
                                         if alt is not None else
                                         "no plan with the other setting was priced (forced, or ZeRO-1 lets nothing "
                                         "more fit, and it moves the same bytes and hides less)"))
    total = max((c.allreduce_total for c in report.simulation.costs), default=0.0)
    if plan.allreduce_overlap:
        off = simulate(replace(plan, allreduce_overlap=False), report.cost_model)
        lines.append(f"  all-reduce overlap on: hides up to {1e3 * total:.4g} ms of gradient all-reduce behind the "
                     f"last backward; without it the plan predicts {ms(off)}")
    else:
        lines.append(f"  all-reduce overlap off ({1e3 * total:.4g} ms after the drain)")
    return lines


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
    if hasattr(report, "alternatives") and hasattr(report, "cost_model"):
        lines += choice_lines(report)
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
