"""The schedules the DP does not price: the best 1F1B structures turned into interleaved and zb plans.

    extra = schedule_variants(cost_model, refiner, ranked, forced)   # [(Plan, Simulation)], each fits

The DP (search.py) prices 1F1B and GPipe with closed forms. Interleaved 1F1B and ZB-H1 have none
that keeps the DP exact, so, rather than multiplying the DP runs, the planner re-ranks its best
structures (replica counts, placement, microbatch count) under them, each with both ZeRO
settings (unless forced), with the simulator (simulate.py), which ranks everything in the end anyway:

- ``zb``: the same stages, with the backward split in B and W.
- ``interleaved`` with v = 2..4 chunks per group (p >= 2 groups, unless ``--virtual-stages`` forces
  it: one group has no bubble to cut): the p groups of the structure each get v chunks
  (S = p v stages, stage i on group i % p); the chunk boundaries come from the exact chain DP of
  refine.py over the blocks (sum of chunk times + (M - 1) x the slowest chunk + the exposed
  all-reduce, each chunk under 1/v of the GPU's memory so a group's chunks fit together). Tried
  at the structure's M and at the next microbatch count of the space that is a multiple of p
  (the schedule's rounds of p microbatches then leave no short last round).

The best variant of each (schedule, v), the ``POLISHED`` fastest of them, then get the
simulator's polish (refine.Refiner.polish: single boundary moves kept while the makespan under
that schedule improves, at most ``POLISH_SIMS`` simulations).

The same 1F1B structure with the other ZeRO setting (boundaries re-placed) joins them: the DP
searches ZeRO-1 only where ZeRO-0 needs checkpointing (search.py, ``zero_if_needed``).

Forced parts narrow the variants as everywhere (forced.py): a forced GPipe schedule tries none, a
forced 1F1B only the ZeRO flip, a forced 'zb' only zb, a forced ``--virtual-stages v`` only that v; a variant that
does not fit in memory (the simulator's group memory) is dropped.
"""

from __future__ import annotations

from dataclasses import replace

from rannc_cli.planner.costmodel import CostModel
from rannc_cli.planner.plan import Plan
from rannc_cli.planner.refine import Refiner, refine
from rannc_cli.planner.search import INF, Candidate
from rannc_cli.planner.simulate import Simulation, simulate

VIRTUAL = (2, 3, 4)  # chunks per group tried for 'interleaved'
STRUCTURES = 3  # distinct 1F1B structures turned into each schedule
POLISH_SIMS = 30  # simulations for the polished variant (the variants' makespans are longer)
POLISHED = 1  # variants polished: the fastest (schedule, v) kind's best


def schedule_variants(cm: CostModel, refiner: Refiner, ranked: list[tuple[Plan, Simulation]], forced,
                      microbatches: list[int]) -> list[tuple[Plan, Simulation]]:
    """Interleaved and zb plans built from the ``STRUCTURES`` best 1F1B plans of ``ranked``."""
    from rannc_cli.planner.planner import candidate_plan, plan_candidate

    want = forced.schedule
    try_zb = want in (None, "zb") and forced.virtual in (None, 1)
    try_interleaved = want == "interleaved" or (want is None and forced.virtual != 1)
    try_flip = want in (None, "1f1b") and forced.virtual in (None, 1) and forced.zero is None
    if not (try_zb or try_interleaved or try_flip):
        return []
    out: list[tuple[Plan, Simulation]] = []
    seen: set[tuple] = set()
    units = len(refiner.bounds) - 1

    def offer(c: Candidate | None) -> None:
        if c is None:
            return
        plan = candidate_plan(c, cm)
        if plan.key() in seen:
            return
        seen.add(plan.key())
        sim = simulate(plan, cm)
        if sim.fits:
            out.append((plan, sim))

    structures: set[tuple] = set()
    for plan, _sim in ranked:
        if plan.schedule != "1f1b" or plan.virtual_stages != 1:
            continue
        key = (plan.microbatches, tuple((st.replicas, st.devices[0]) for st in plan.stages))
        if key in structures:
            continue
        structures.add(key)
        first = plan_candidate(plan, cm, INF)
        shardable = any(st[2] > 1 for st in first.stages)  # ZeRO-1 over one replica changes nothing
        zeros = [first.zero] if forced.zero is not None or not shardable else [first.zero, 1 - first.zero]
        for base in [replace(first, zero=z) for z in zeros]:
            if try_flip and base.zero != first.zero:  # the same 1F1B structure with the other ZeRO setting
                offer(refine(cm, base, refiner.bounds, chain=refiner.chain(base)))
            if try_zb:
                offer(replace(base, schedule="zb"))
            if try_interleaved:
                for cand in _interleaved(cm, base, forced, microbatches, units):
                    offer(refine(cm, cand, refiner.bounds, chain=refiner.chain(cand)))
        if len(structures) >= STRUCTURES:
            break
    # the simulator's polish for the best variant of each schedule (and v): its makespans are long
    best: dict[tuple, tuple[Plan, Simulation]] = {}
    for plan, sim in out:
        kind = (plan.schedule, plan.virtual_stages)
        if kind not in best or sim.step_seconds < best[kind][1].step_seconds:
            best[kind] = (plan, sim)
    for plan, sim in sorted(best.values(), key=lambda ps: ps[1].step_seconds)[:POLISHED]:
        got = refiner.polish(plan_candidate(plan, cm, sim.objective_seconds), max_sims=POLISH_SIMS)
        if got is not None:
            offer(got[0])
    return out


def _interleaved(cm: CostModel, base: Candidate, forced, microbatches: list[int], units: int) -> list[Candidate]:
    """Interleaved structures of ``base``'s p groups: v chunks each (boundaries still to place)."""
    p = len(base.stages)
    if p < 2 and forced.virtual is None:  # one group has no bubble to cut: chunks would only add cuts
        return []
    vs = [forced.virtual] if forced.virtual is not None else list(VIRTUAL)
    ms = [base.microbatches]
    if forced.microbatches is None:
        ms += [m for m in microbatches if m > base.microbatches and m % p == 0][:1]
    out = []
    for v in vs:
        if p * v > units:
            continue
        for m in ms:
            if max(st[2] for st in base.stages) <= cm.microbatch(m):
                stages = tuple((0, 0, st[2], st[3], False) for _ in range(v) for st in base.stages)
                out.append(Candidate(INF, "interleaved", m, stages, v, base.zero, base.overlap))
    return out
