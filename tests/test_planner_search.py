"""The DP search against brute force, on random small profiles and clusters (hypothesis)."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings, strategies as st

from rannc_cli.planner.cluster import ClusterSpec
from rannc_cli.planner.costmodel import CostModel
from rannc_cli.planner.exhaustive import exhaustive
from rannc_cli.planner.plan import stage_costs
from rannc_cli.planner.planner import candidate_plan
from rannc_cli.planner.search import SearchSpace, search
from rannc_cli.planner.simulate import simulate
from rannc_cli.planner.synthetic import random_profile


def instance(seed: int, max_blocks: int = 6):
    rng = random.Random(seed)
    prof = random_profile(rng, blocks=rng.randint(1, max_blocks), batch_size=rng.choice([1, 2, 4, 8, 16]))
    need = CostModel(prof, ClusterSpec.from_flags(1, 1, 1 << 40)).total_static_memory()
    mem = int(max(need, 1e6) * rng.uniform(0.3, 2.0))  # from "nothing fits" to "fits on one GPU"
    cluster = ClusterSpec.from_flags(rng.choice([1, 2]), rng.choice([1, 2, 3, 4]), mem)
    cm = CostModel(prof, cluster)
    forced = rng.choice([{}, {}, {"schedules": ["gpipe"]}, {"stages": rng.randint(1, 3)},
                         {"microbatches": [rng.choice([1, min(2, prof.batch_size)])]}])
    return cm, SearchSpace.build(cm, **forced)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10**9))
def test_dp_finds_the_exhaustive_optimum(seed):
    cm, space = instance(seed)
    bounds = list(range(cm.n + 1))
    result = search(cm, bounds, space, budget=None)
    dp = result.best
    assert result.exact
    brute, _ = exhaustive(cm, bounds, space)
    assert (dp is None) == (brute is None)
    if dp is not None:
        assert abs(dp.objective - brute.objective) <= 1e-9 * brute.objective
        # the DP's own arithmetic agrees with the scalar cost model on its plan
        plan = candidate_plan(dp, cm)
        assert abs(simulate(plan, cm).objective_seconds - dp.objective) <= 1e-9 * dp.objective


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10**9))
def test_every_returned_plan_is_valid(seed):
    cm, space = instance(seed, max_blocks=7)
    result = search(cm, list(range(cm.n + 1)), space)
    for cand in result.candidates:
        plan = candidate_plan(cand, cm)
        plan.validate(cm.n, cm.cluster)  # each block once, in order; GPUs distinct and inside the cluster
        covered = [b for s in plan.stages for b in s.blocks]
        assert covered == list(range(cm.n))
        for s in plan.stages:  # data only flows forward: every input comes from this or an earlier stage
            for b in s.blocks:
                assert all(p < s.end for p in cm.profile.predecessors(b))
        sim = simulate(plan, cm)
        assert all(m <= cm.capacity for m in sim.memory)
        assert all(c.feasible for c in stage_costs(plan, cm))
        if space.stages is not None:
            assert len(plan.stages) == space.stages
        assert plan.microbatches in space.microbatches and plan.schedule in (space.schedules + ["gpipe"])


def test_forced_replicas_are_honoured():
    cm, _ = instance(3)
    cm = CostModel(random_profile(random.Random(5), blocks=5, batch_size=8), ClusterSpec.from_flags(1, 4, 1 << 34))
    space = SearchSpace.build(cm, replicas=[2, 1, 1])
    best = search(cm, list(range(cm.n + 1)), space).best
    assert [s[2] for s in best.stages] == [2, 1, 1]
    brute, _ = exhaustive(cm, list(range(cm.n + 1)), space)
    assert abs(best.objective - brute.objective) <= 1e-9 * brute.objective


def test_neighbouring_stages_share_a_node_when_it_pays():
    from rannc_cli.planner.synthetic import bert_profile

    prof = bert_profile(layers=8, hidden=1024, seq=512, batch_size=32)
    cm = CostModel(prof, ClusterSpec.from_flags(2, 4, "16GiB"))
    best = search(cm, list(range(cm.n + 1)), SearchSpace.build(cm, stages=2, replicas=[2, 2])).best
    starts = [s[3] for s in best.stages]
    assert starts == [0, 2]  # both stages on node 0: activations cross NVLink/PCIe, not the network
