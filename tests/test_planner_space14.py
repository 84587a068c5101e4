"""The larger plan space (issue 14): interleaved and zb schedules, ZeRO-1, overlapped all-reduce.

Closed forms for balanced pipelines, the fast makespan against the event simulation, the DP
against brute force with the new options, forced flags and the --explain lines."""

from __future__ import annotations

import random

import pytest
from conftest import run_cli
from hypothesis import HealthCheck, given, settings, strategies as st

from rannc_cli.errors import RanncError
from rannc_cli.planner.cluster import ClusterSpec
from rannc_cli.planner.costmodel import CostModel, exposed_allreduce
from rannc_cli.planner.exhaustive import exhaustive
from rannc_cli.planner.explain import explain
from rannc_cli.planner.plan import Plan, StagePlan
from rannc_cli.planner.planner import candidate_plan, make_plan
from rannc_cli.planner.search import SearchSpace, search
from rannc_cli.planner.simulate import makespan, simulate, simulate_times
from rannc_cli.planner.synthetic import bert_profile, random_profile


@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("v", [1, 2, 3, 4])
@pytest.mark.parametrize("rounds", [1, 2, 4])
def test_balanced_interleaved_bubble_is_p_minus_1_over_v(p, v, rounds):
    """Megatron-LM: with M a multiple of p the bubble is (p - 1) (f + b) / v."""
    f, b, m = 1.0, 2.0, rounds * p
    S = p * v
    got = makespan([f / v] * S, [b / v] * S, "interleaved", m, v)
    assert got == pytest.approx(m * (f + b) + (p - 1) * (f + b) / v, rel=1e-12)


@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("m", [8, 16])
def test_balanced_zero_bubble_h1(p, m):
    """ZB-H1 (Qi et al.): bubble (p - 1) (F + B - W) with B the input- and W the weight-gradient part;
    1F1B's is (p - 1) (F + B + W)."""
    f, b, w = 1.0, 2.0, 1.0
    zb = makespan([f] * p, [b] * p, "zb", m, 1, [w] * p)
    one = makespan([f] * p, [b] * p, "1f1b", m)
    assert zb == pytest.approx(m * (f + b) + (p - 1) * (f + (b - w) - w), rel=1e-12)
    assert one == pytest.approx(m * (f + b) + (p - 1) * (f + b), rel=1e-12)
    assert zb < one


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10**9))
def test_makespan_equals_the_event_simulation(seed):
    rng = random.Random(seed)
    sched = rng.choice(["1f1b", "gpipe", "zb", "interleaved"])
    v = rng.randint(2, 3) if sched == "interleaved" else 1
    p, m = rng.randint(1, 4), rng.randint(1, 9)
    S = p * v
    f = [rng.uniform(0.5, 2) for _ in range(S)]
    b = [rng.uniform(1, 4) for _ in range(S)]
    w = [x * rng.uniform(0, 0.7) for x in b] if sched == "zb" else None
    end, events = simulate_times(f, b, sched, m, v, w)
    assert makespan(f, b, sched, m, v, w) == end
    assert len(events) == S * m * (3 if sched == "zb" else 2)
    done = {(e.kind, e.stage, e.microbatch): e for e in events}
    for e in events:  # data dependencies hold
        if e.kind == "F" and e.stage > 0:
            assert done[("F", e.stage - 1, e.microbatch)].end <= e.start + 1e-12
        if e.kind == "B" and e.stage < S - 1:
            assert done[("B", e.stage + 1, e.microbatch)].end <= e.start + 1e-12
        if e.kind == "W":
            assert done[("B", e.stage, e.microbatch)].end <= e.start + 1e-12


def _small():
    prof = bert_profile(layers=4, hidden=256, seq=64, vocab=1000, batch_size=16)
    spec = ClusterSpec.from_flags(1, 4, "1GiB")
    return prof, spec, CostModel(prof, spec)


def _stages(n_blocks: int, S: int, devs: list[list[tuple[int, int]]]) -> list[StagePlan]:
    cuts = [round(i * n_blocks / S) for i in range(S + 1)]
    return [StagePlan(cuts[i], cuts[i + 1], len(devs[i % len(devs)]), devs[i % len(devs)]) for i in range(S)]


def test_interleaved_memory_is_the_sum_of_a_groups_chunks_and_zero_shards_the_optimizer_state():
    prof, spec, cm = _small()
    n = len(prof.blocks)
    devs = [[(0, 0), (0, 1)], [(0, 2), (0, 3)]]
    plan = Plan("interleaved", 4, 16, _stages(n, 4, devs), virtual_stages=2)
    plan.validate(n, spec)
    sim = simulate(plan, cm)
    for g in range(2):
        chunks = [sim.costs[s] for s in (g, g + 2)]
        expect = sum(c.memory - c.work_peak for c in chunks) + max(c.work_peak for c in chunks)
        assert sim.memory[g] == pytest.approx(expect) and sim.memory[g + 2] == sim.memory[g]
        assert sim.memory[g] > max(c.memory for c in chunks)
    assert {e.group for e in sim.events} == {0, 1}
    plain = simulate(Plan("1f1b", 4, 16, _stages(n, 2, devs)), cm)
    sharded = simulate(Plan("1f1b", 4, 16, _stages(n, 2, devs), zero=1), cm)
    for s, st_ in enumerate(plain.costs):
        opt = cm.range_info(*(lambda x: (x.start, x.end))(Plan("1f1b", 4, 16, _stages(n, 2, devs)).stages[s])).trainable_bytes
        assert plain.memory[s] - sharded.memory[s] == pytest.approx(opt * cm.opt_factor / 2)  # r = 2: half the state
    # no overlap: the all-reduce after the drain, then ZeRO-1's parameter all-gather (half an all-reduce)
    ar = plain.step_seconds - plain.pipeline_seconds
    assert ar > 0 and sharded.step_seconds == pytest.approx(plain.pipeline_seconds + 1.5 * ar)


def test_overlap_charges_only_the_exposed_part():
    prof, spec, cm = _small()
    n = len(prof.blocks)
    devs = [[(0, 0), (0, 1)], [(0, 2), (0, 3)]]
    off = simulate(Plan("1f1b", 4, 16, _stages(n, 2, devs)), cm)
    on = simulate(Plan("1f1b", 4, 16, _stages(n, 2, devs), allreduce_overlap=True), cm)
    assert on.pipeline_seconds == off.pipeline_seconds and on.step_seconds <= off.step_seconds
    for c in on.costs:
        assert c.allreduce <= c.allreduce_total and c.allreduce >= c.allreduce_total * min(1.0, 25 * 2**20 / 1e12)
    # the closed form: hideable part behind the last backward, the last bucket always sticks out
    assert exposed_allreduce(10.0, 4.0, 100.0, 0, True, 10.0) == pytest.approx(6.0)
    assert exposed_allreduce(10.0, 40.0, 100.0, 0, True, 10.0) == pytest.approx(1.0)
    # ZeRO-1 (runtime/zero.py): the whole all-reduce hides as before, the all-gather (half) comes after the step
    assert exposed_allreduce(10.0, 40.0, 100.0, 1, True, 10.0) == pytest.approx(6.0)
    assert exposed_allreduce(10.0, 4.0, 100.0, 1, True, 10.0) == pytest.approx(11.0)
    assert exposed_allreduce(10.0, 40.0, 100.0, 1, False, 10.0) == pytest.approx(15.0)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10**9))
def test_dp_finds_the_exhaustive_optimum_with_zero_and_overlap(seed):
    rng = random.Random(seed)
    prof = random_profile(rng, blocks=rng.randint(1, 5), batch_size=rng.choice([2, 4, 8]))
    need = CostModel(prof, ClusterSpec.from_flags(1, 1, 1 << 40)).total_static_memory()
    cluster = ClusterSpec.from_flags(rng.choice([1, 2]), rng.choice([2, 4]), int(max(need, 1e6) * rng.uniform(0.3, 2.0)))
    cm = CostModel(prof, cluster)
    space = SearchSpace.build(cm, zero=rng.choice([[0, 1], [1]]), overlap=rng.random() < 0.7)
    bounds = list(range(cm.n + 1))
    result = search(cm, bounds, space, budget=None)
    brute, _ = exhaustive(cm, bounds, space)
    assert (result.best is None) == (brute is None)
    if brute is not None:
        assert result.exact
        assert result.best.objective == pytest.approx(brute.objective, rel=1e-9)
        plan = candidate_plan(result.best, cm)
        assert (plan.zero, plan.allreduce_overlap) == (result.best.zero, space.overlap)
        assert simulate(plan, cm).objective_seconds == pytest.approx(result.best.objective, rel=1e-9)


@pytest.fixture(scope="module")
def bert8():
    prof = bert_profile(layers=8, hidden=256, seq=64, vocab=1000, batch_size=32)
    return prof, ClusterSpec.from_flags(1, 4, "1GiB")


@pytest.mark.parametrize("kw,check", [
    ({"schedule": "zb"}, lambda p: p.schedule == "zb" and p.virtual_stages == 1),
    ({"virtual_stages": 2}, lambda p: p.schedule == "interleaved" and p.virtual_stages == 2 and len(p.stages) == 2 * p.groups),
    ({"schedule": "interleaved", "virtual_stages": 2, "stages": 2},
     lambda p: p.groups == 2 and len(p.stages) == 4),
    ({"zero": 1}, lambda p: p.zero == 1),
    ({"zero": 0, "schedule": "1f1b"}, lambda p: p.zero == 0 and p.schedule == "1f1b"),
])
def test_forced_new_parts_are_honoured(bert8, kw, check):
    prof, spec = bert8
    rep = make_plan(prof, spec, with_baselines=False, **kw)
    assert check(rep.plan), rep.plan
    rep.plan.validate(len(prof.blocks), spec)
    assert rep.plan.allreduce_overlap


@pytest.mark.parametrize("kw,message", [
    ({"zero": 2}, "--zero 2 is not known"),
    ({"virtual_stages": 2, "schedule": "1f1b"}, "needs the interleaved schedule"),
    ({"virtual_stages": 0}, "at least 1"),
    ({"schedule": "zigzag"}, "is not known"),
])
def test_bad_new_flags_are_refused(bert8, kw, message):
    prof, spec = bert8
    with pytest.raises(RanncError, match=message):
        make_plan(prof, spec, with_baselines=False, **kw)


def test_explain_names_every_new_choice(bert8):
    prof, spec = bert8
    lines = explain(make_plan(prof, spec))
    text = "\n".join(lines)
    for what in ("schedule 1f1b", "schedule zb", "schedule interleaved v=2", "ZeRO-1", "all-reduce overlap"):
        assert what in text, text
    assert sum("chosen" in line and "not chosen" not in line for line in lines[1:]) >= 1


def test_cli_refuses_a_bad_zero_in_one_line(tmp_path):
    prof = tmp_path / "p.yaml"
    bert_profile(layers=2, hidden=128, seq=32, vocab=500, batch_size=8).save(prof)
    res = run_cli("plan", "--profile", str(prof), "--nodes", "1", "--gpus", "2", "--zero", "3")
    assert res.returncode == 2 and res.stderr.startswith("error: --zero 3") and "Traceback" not in res.stderr, res.stderr


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10**9))
def test_bound_mode_is_below_every_simulated_plan(seed):
    """plan_optimum.py's 'v2 DP bound': the pipeline term plus only the first stage's exposed all-reduce."""
    rng = random.Random(seed)
    prof = random_profile(rng, blocks=rng.randint(1, 5), batch_size=rng.choice([2, 4, 8]))
    cm = CostModel(prof, ClusterSpec.from_flags(rng.choice([1, 2]), rng.choice([2, 4]), 1 << 40))
    bounds = list(range(cm.n + 1))
    space = SearchSpace.build(cm, schedules=["1f1b", "gpipe"], zero=[0, 1], overlap=True)
    plans = search(cm, bounds, space, budget=None).candidates
    space.bound, space.tie = True, 0.0  # no one-microbatch tie-break term in a bound
    low = search(cm, bounds, space, budget=None).lower_bound
    for cand in plans:
        assert simulate(candidate_plan(cand, cm), cm).step_seconds >= low * (1 - 1e-9)


def test_virtual_stages_1_still_allows_zb_but_no_interleaving(bert8):
    prof, spec = bert8
    rep = make_plan(prof, spec, with_baselines=False, virtual_stages=1)
    assert rep.plan.virtual_stages == 1
    assert all(p.virtual_stages == 1 for p, _ in rep.alternatives)
    assert any(p.schedule == "zb" for p, _ in [(rep.plan, None), *rep.alternatives])


@pytest.mark.parametrize("schedule,v", [("interleaved", 2), ("zb", 1)])
def test_timeline_draws_one_row_per_gpu_group(tmp_path, schedule, v):
    import struct

    from rannc_cli.planner.timeline import draw_timeline

    prof, spec, cm = _small()
    devs = [[(0, 0), (0, 1)], [(0, 2), (0, 3)]]
    plan = Plan(schedule, 4, 16, _stages(len(prof.blocks), 2 * v, devs), virtual_stages=v)
    sim = simulate(plan, cm)
    assert ("W" in {e.kind for e in sim.events}) == (schedule == "zb")
    path = draw_timeline(plan, sim, tmp_path / "t.png")
    width, height = struct.unpack(">II", path.read_bytes()[16:24])  # PNG IHDR
    assert height == round(120 * (1.0 + 0.45 * 2))  # two rows: the groups, not the 2 v stages
