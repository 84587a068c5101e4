"""Schedules and the event simulator, alone."""

from __future__ import annotations

import random

import pytest

from rannc_cli.planner.schedules import gpipe, one_f_one_b, peak_in_flight, stage_ops
from rannc_cli.planner.simulate import simulate_times


@pytest.mark.parametrize("stages,mbs", [(1, 1), (1, 5), (3, 4), (4, 2), (5, 8)])
@pytest.mark.parametrize("name", ["1f1b", "gpipe"])
def test_each_op_once_forward_before_backward(name, stages, mbs):
    for ops in stage_ops(name, stages, mbs):
        assert sorted(ops) == sorted([("F", m) for m in range(mbs)] + [("B", m) for m in range(mbs)])
        for m in range(mbs):
            assert ops.index(("F", m)) < ops.index(("B", m))


def test_1f1b_matches_the_documented_table():
    assert one_f_one_b(3, 4)[0] == [("F", 0), ("F", 1), ("F", 2), ("B", 0), ("F", 3), ("B", 1), ("B", 2), ("B", 3)]
    assert one_f_one_b(3, 4)[2] == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2), ("F", 3), ("B", 3)]


@pytest.mark.parametrize("stages,mbs", [(1, 4), (3, 2), (4, 8), (6, 3)])
def test_in_flight_counts(stages, mbs):
    assert [peak_in_flight(o) for o in one_f_one_b(stages, mbs)] == [min(mbs, stages - s) for s in range(stages)]
    assert [peak_in_flight(o) for o in gpipe(stages, mbs)] == [mbs] * stages


def test_gpipe_simulation_equals_its_closed_form():
    rng = random.Random(0)
    for _ in range(300):
        s, m = rng.randint(1, 6), rng.randint(1, 8)
        f = [rng.choice([0.0, rng.random(), 10 * rng.random()]) for _ in range(s)]
        b = [rng.choice([0.0, rng.random(), 10 * rng.random()]) for _ in range(s)]
        makespan, _ = simulate_times(f, b, "gpipe", m)
        closed = sum(f) + sum(b) + (m - 1) * (max(f) + max(b))
        assert makespan == pytest.approx(closed, rel=1e-12, abs=1e-12)


def test_1f1b_simulation_equals_bubble_formula_when_balanced():
    rng = random.Random(1)
    for _ in range(100):
        s, m = rng.randint(1, 6), rng.randint(1, 8)
        f, b = rng.random(), rng.random()
        makespan, _ = simulate_times([f] * s, [b] * s, "1f1b", m)
        assert makespan == pytest.approx((m + s - 1) * (f + b), rel=1e-12)


def test_1f1b_is_never_slower_than_gpipe_closed_form_on_typical_stages():
    rng = random.Random(2)
    for _ in range(200):
        s, m = rng.randint(1, 6), rng.randint(1, 8)
        f = [rng.uniform(0.1, 1) for _ in range(s)]
        b = [x * rng.uniform(1.8, 3.2) for x in f]
        one, _ = simulate_times(f, b, "1f1b", m)
        gp, _ = simulate_times(f, b, "gpipe", m)
        assert one <= gp * (1 + 1e-12)


def test_events_respect_dependencies():
    makespan, events = simulate_times([1.0, 2.0, 0.5], [2.0, 3.0, 1.0], "1f1b", 4)
    end = {(e.kind, e.stage, e.microbatch): e.end for e in events}
    start = {(e.kind, e.stage, e.microbatch): e.start for e in events}
    for (kind, s, m), t0 in start.items():
        if kind == "F" and s > 0:
            assert t0 >= end[("F", s - 1, m)]
        if kind == "B" and s < 2:
            assert t0 >= end[("B", s + 1, m)]
    per_stage = {}
    for e in events:  # one op at a time per stage
        per_stage.setdefault(e.stage, []).append((e.start, e.end))
    for spans in per_stage.values():
        spans.sort()
        assert all(a[1] <= b[0] + 1e-12 for a, b in zip(spans, spans[1:]))
    assert makespan == max(e.end for e in events)


def test_1f1b_objective_is_closer_to_the_simulation_than_the_bubble_formula():
    from types import SimpleNamespace

    from rannc_cli.planner.costmodel import TIE_WEIGHT, objective

    rng = random.Random(3)
    worse = 0
    for _ in range(300):
        s, m = rng.randint(1, 10), rng.choice([1, 2, 4, 8, 16, 32])
        f = [rng.uniform(0.1, 1) for _ in range(s)]
        b = [x * rng.uniform(1.5, 3) for x in f]
        sim, _ = simulate_times(f, b, "1f1b", m)
        costs = [SimpleNamespace(forward=x, backward=y, allreduce=0.0) for x, y in zip(f, b)]
        ours = objective("1f1b", m, costs)
        if m == 1:  # less the one-microbatch tie-break term (costmodel.TIE_WEIGHT), which the simulation lacks
            ours -= TIE_WEIGHT * max(x + y for x, y in zip(f, b))
        bubble = sum(f) + sum(b) + (m - 1) * max(x + y for x, y in zip(f, b))
        assert bubble >= sim * (1 - 1e-12)  # the bubble formula is an upper bound ...
        assert ours <= sim * (1 + 1e-12)  # ... this one a lower bound (it credits the warm-up overlap fully)
        worse += abs(ours - sim) > abs(bubble - sim) + 1e-12
    assert worse <= 30


def test_makespan_equals_the_event_simulation():
    from rannc_cli.planner.simulate import makespan

    rng = random.Random(4)
    for _ in range(300):
        s, m = rng.randint(1, 9), rng.randint(1, 12)
        f = [rng.random() for _ in range(s)]
        b = [rng.random() * 3 for _ in range(s)]
        for sched in ("1f1b", "gpipe"):
            assert makespan(f, b, sched, m) == simulate_times(f, b, sched, m)[0]


# ---------------------------------------------------------------- rank_ops: interleaved and zero-bubble
from rannc_cli.planner.schedules import _stuck_groups, peak_in_flight_per_stage, rank_ops  # noqa: E402


@pytest.mark.parametrize("groups", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("virtual", [1, 2, 3])
@pytest.mark.parametrize("mbs", [1, 2, 3, 4, 5, 8, 9])
def test_interleaved_runs_every_op_once_and_never_stalls(groups, virtual, mbs):
    orders = rank_ops("interleaved", groups, mbs, virtual)
    for g, ops in enumerate(orders):
        expect = [(k, m, c * groups + g) for k in "FB" for m in range(mbs) for c in range(virtual)]
        assert sorted(ops) == sorted(expect)
        for m in range(mbs):
            for c in range(virtual):
                assert ops.index(("F", m, c * groups + g)) < ops.index(("B", m, c * groups + g))
    assert _stuck_groups(orders, groups * virtual) == []


def test_interleaved_follows_megatron_rounds():
    # p = 2, M = 4, v = 2: group 0 holds stages 0 and 2; warm-up 2 (p - 1) + (v - 1) p = 4 forwards
    assert rank_ops("interleaved", 2, 4, 2)[0][:6] == [
        ("F", 0, 0), ("F", 1, 0), ("F", 0, 2), ("F", 1, 2), ("F", 2, 0), ("B", 0, 2)]
    assert rank_ops("interleaved", 3, 6, 1) == rank_ops("1f1b", 3, 6)


@pytest.mark.parametrize("stages,mbs", [(1, 3), (2, 2), (3, 4), (4, 8), (5, 3)])
def test_zero_bubble_splits_every_backward_and_keeps_1f1b_peak(stages, mbs):
    orders = rank_ops("zb", stages, mbs)
    for s, ops in enumerate(orders):
        assert [op for op in ops if op[0] != "W"] == [(k, m, s) for k, m in one_f_one_b(stages, mbs)[s]]
        for m in range(mbs):
            assert ops.index(("B", m, s)) < ops.index(("W", m, s))
        assert peak_in_flight(ops) <= min(mbs, stages)
    assert _stuck_groups(orders, stages) == []


def test_peak_per_stage_of_an_interleaved_group():
    assert peak_in_flight_per_stage(rank_ops("interleaved", 2, 4, 2)[0]) == {0: 4, 2: 2}
