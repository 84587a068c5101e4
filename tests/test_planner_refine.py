"""Boundary refinement (exact for a fixed structure, against brute force) and simulator polishing."""

from __future__ import annotations

import itertools
import random

from hypothesis import HealthCheck, given, settings, strategies as st

from rannc_cli.planner.cluster import ClusterSpec
from rannc_cli.planner.costmodel import CostModel, in_flight, objective
from rannc_cli.planner.placement import allreduce_link, link_in
from rannc_cli.planner.plan import plan_objective
from rannc_cli.planner.planner import candidate_plan, make_plan, rank_key
from rannc_cli.planner.refine import Refiner, refine
from rannc_cli.planner.search import SearchSpace, search
from rannc_cli.planner.simulate import simulate
from rannc_cli.planner.synthetic import bert_profile, random_profile


def brute(cm, cand, n):
    """Best objective over every boundary choice with cand's stage structure (None if none fits)."""
    best = None
    S = len(cand.stages)
    for cuts in itertools.combinations(range(1, n), S - 1):
        b = [0, *cuts, n]
        c = type(cand)(0.0, cand.schedule, cand.microbatches,
                       tuple((b[i], b[i + 1], st_[2], st_[3], False) for i, st_ in enumerate(cand.stages)))
        plan = candidate_plan(c, cm)
        # the search's rule: checkpoint a stage only when it does not fit without it
        costs, prev = [], None
        for i, s in enumerate(plan.stages):
            sc = cm.best_stage_cost(s.start, s.end, s.replicas, plan.microbatches, link_in(prev, s.devices),
                                    allreduce_link(s.devices), in_flight(plan.schedule, plan.microbatches, S, i))
            if not sc.feasible:
                break
            costs.append(sc)
            prev = s.devices
        else:
            obj = objective(plan.schedule, plan.microbatches, costs)
            best = obj if best is None else min(best, obj)
    return best


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10**9))
def test_refinement_is_exact_for_the_structure(seed):
    rng = random.Random(seed)
    prof = random_profile(rng, blocks=rng.randint(2, 8), batch_size=rng.choice([2, 4, 8, 16]))
    need = CostModel(prof, ClusterSpec.from_flags(1, 1, 1 << 40)).total_static_memory()
    cm = CostModel(prof, ClusterSpec.from_flags(rng.choice([1, 2]), rng.choice([1, 2, 4]), int(max(need, 1e6) * rng.uniform(0.4, 2.0))))
    coarse = sorted({0, cm.n, *rng.sample(range(1, cm.n), k=min(cm.n - 1, rng.randint(0, 3)))}) if cm.n > 1 else [0, 1]
    space = SearchSpace.build(cm, schedules=[rng.choice(["1f1b", "gpipe"])])
    res = search(cm, coarse, space, budget=None)
    if res.best is None:
        return
    fine = list(range(cm.n + 1))
    got = refine(cm, res.best, fine)
    assert got is not None and got.objective <= res.best.objective * (1 + 1e-12)
    want = brute(cm, res.best, cm.n)
    assert abs(got.objective - want) <= 1e-9 * want
    plan = candidate_plan(got, cm)
    plan.validate(cm.n, cm.cluster)
    assert abs(plan_objective(plan, cm) - got.objective) <= 1e-9 * got.objective
    polished = Refiner(cm, fine).polish(got)
    assert polished is not None
    cand, key = polished  # the ranking key: simulated step (+ the one-microbatch tie-break term)
    assert key <= rank_key(plan, simulate(plan, cm))[0] * (1 + 1e-12)
    better = candidate_plan(cand, cm)
    assert abs(rank_key(better, simulate(better, cm))[0] - key) <= 1e-9 * key


def test_make_plan_beats_coarse_units_with_refinement():
    prof = bert_profile(layers=12, hidden=1024, seq=512, batch_size=64)
    cluster = ClusterSpec.from_flags(2, 4, "16GiB")
    fine = make_plan(prof, cluster, max_units=4)
    time_base = fine.baselines["time"]
    assert fine.search_step_seconds <= time_base.simulation.step_seconds * (1 + 1e-9)
    assert fine.chosen_from == "search"
