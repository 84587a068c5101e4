"""Forced parts hold or are refused; every returned plan passes the runtime's acceptance check."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from rannc_cli.errors import RanncError
from rannc_cli.planner.baselines import balanced_split
from rannc_cli.planner.cluster import ClusterSpec
from rannc_cli.planner.costmodel import CostModel
from rannc_cli.planner.exhaustive import exhaustive
from rannc_cli.planner.forced import Forced
from rannc_cli.planner.planner import candidate_plan, make_plan
from rannc_cli.planner.redistribution import check_plan_runs, cut_blocked
from rannc_cli.planner.search import SearchSpace, search
from rannc_cli.planner.synthetic import bert_profile, random_profile

# what a refusal of a forced part names (its flag, or the cause it cannot hold)
CAUSES = ("--stages", "--replicas", "--microbatches", "--schedule", "--checkpoint", "forced", "processes",
          "replicas", "microbatch", "no plan fits", "fixed batch size")


def _cluster_for(prof, rng: random.Random) -> ClusterSpec:
    need = CostModel(prof, ClusterSpec.from_flags(1, 1, 1 << 40)).total_static_memory()
    mem = int(max(need, 1e6) * rng.uniform(0.5, 3.0))
    return ClusterSpec.from_flags(rng.choice([1, 2]), rng.choice([1, 2, 4]), mem)


def _forced(rng: random.Random, gpus: int, batch: int) -> dict:
    out: dict = {}
    if rng.random() < 0.4:
        out["stages"] = rng.randint(1, 4)
    if rng.random() < 0.3:
        out.pop("stages", None)
        out["replicas"] = [rng.choice([1, 1, 2, 4]) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.5:
        out["microbatches"] = rng.choice([1, 2, 4, 8])
    if rng.random() < 0.3:
        out["schedule"] = rng.choice(["1f1b", "gpipe"])
    if rng.random() < 0.3:
        out["checkpoint"] = rng.choice(["on", "off"])
    if rng.random() < 0.4:
        out["all_devices"] = True
    return out


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10**9))
def test_every_forced_part_holds_or_is_refused_with_its_cause(seed):
    rng = random.Random(seed)
    prof = random_profile(rng, blocks=rng.randint(2, 9), batch_size=rng.choice([1, 2, 4, 8, 16]),
                          batchless=rng.choice([0.0, 0.3]))
    cluster = _cluster_for(prof, rng)
    kw = _forced(rng, cluster.devices, prof.batch_size)
    try:
        report = make_plan(prof, cluster, max_units=rng.choice([2, 3, 24]), with_baselines=rng.random() < 0.3, **kw)
    except RanncError as exc:
        text = exc.message + " " + (exc.hint or "")
        assert "\n" not in exc.message and any(c in text for c in CAUSES), text
        return
    forced = Forced(kw.get("stages"), tuple(kw["replicas"]) if "replicas" in kw else None, kw.get("microbatches"),
                    kw.get("schedule"), kw.get("checkpoint"))
    for plan, _ in [(report.plan, report.simulation), *report.alternatives]:
        plan.validate(len(prof.blocks), cluster)
        assert forced.violations(plan, cluster.devices) == [], (kw, plan)
        check_plan_runs(prof, plan)  # the runtime's own acceptance rule (runtime/executor.py calls it too)
    if kw.get("all_devices") and report.plan.devices_used < cluster.devices:  # idle GPUs only with the reason
        assert report.plan.predicted["idle_reason"].startswith(f"uses {report.plan.devices_used} of {cluster.devices}")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10**9))
def test_the_dp_never_cuts_a_batchless_value_between_unequal_replicas_and_matches_brute_force(seed):
    rng = random.Random(seed)
    prof = random_profile(rng, blocks=rng.randint(2, 6), batch_size=rng.choice([2, 4, 8]), batchless=0.5)
    cluster = _cluster_for(prof, rng)
    cm = CostModel(prof, cluster)
    space = SearchSpace.build(cm, all_devices=rng.random() < 0.4, checkpoint=rng.choice([None, None, "on", "off"]),
                              microbatches=rng.choice([None, [1], [2]]) if prof.batch_size >= 2 else None)
    bounds = list(range(cm.n + 1))
    result = search(cm, bounds, space, budget=None)
    brute, _ = exhaustive(cm, bounds, space)
    assert (result.best is None) == (brute is None)
    if brute is None:
        return
    assert abs(result.best.objective - brute.objective) <= 1e-9 * brute.objective
    blocked = cut_blocked(prof)
    for cand in result.candidates:
        plan = candidate_plan(cand, cm)
        check_plan_runs(prof, plan)
        for a, b in zip(plan.stages, plan.stages[1:]):
            assert not blocked[b.start] or a.replicas == b.replicas
        if space.all_devices:
            assert plan.devices_used == cluster.devices
        if space.checkpoint is not None:
            assert all(s.checkpoint == (space.checkpoint == "on") for s in plan.stages)


def test_forced_parts_on_a_coarsened_profile_are_not_split_further():
    """The refine step used to split every stage in two (and double M): --stages 3 gave 6 stages."""
    prof = bert_profile(layers=32, hidden=512, seq=128, vocab=8000, batch_size=64)
    cluster = ClusterSpec.from_flags(2, 4, "16GiB")
    a = make_plan(prof, cluster, stages=3, microbatches=4)
    assert a.plan.groups == 3 and a.plan.microbatches == 4  # --stages counts GPU groups (interleaving adds chunks)
    b = make_plan(prof, cluster, replicas=[4, 2, 2], microbatches=2)
    assert [s.replicas for s in b.plan.stages] == [4, 2, 2] * b.plan.virtual_stages and b.plan.microbatches == 2
    assert a.baseline_notes["data-parallel"] == "not applicable with --stages 3"
    c = make_plan(prof, cluster, checkpoint="on", microbatches=8)
    assert all(s.checkpoint for s in c.plan.stages) and c.plan.microbatches == 8


@pytest.mark.parametrize("kw,cause", [
    ({"stages": 9}, "--stages 9 needs at least 9 GPUs"),
    ({"replicas": [8], "microbatches": 16}, "needs microbatches of at least 8 samples"),
    ({"microbatches": 128}, "more than the batch of 64"),
    ({"replicas": [2, 1], "all_devices": True}, "would stay idle"),
    ({"stages": 1, "microbatches": 32, "all_devices": True}, "cannot all get work"),
])
def test_impossible_forced_parts_get_their_own_cause(kw, cause):
    prof = bert_profile(layers=4, hidden=256, seq=64, vocab=4000, batch_size=64)
    with pytest.raises(RanncError) as err:
        make_plan(prof, ClusterSpec.from_flags(2, 4, "16GiB"), **kw)
    assert cause in err.value.message and "no plan fits" not in err.value.message


def stage_balance(prof, plan, cm) -> float:
    """Slowest stage's compute over the least slowest stage any cut of the blocks allows."""
    fwd, bwd, _, _, _ = cm.block_arrays(cm.shard(plan.microbatches, 1))
    w = [float(f + b) for f, b in zip(fwd, bwd)]
    cuts = balanced_split(w, len(plan.stages))
    best = max(sum(w[cuts[i]:cuts[i + 1]]) for i in range(len(plan.stages)))
    got = max(sum(w[s.start:s.end]) for s in plan.stages)
    return got / best


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_a_forced_stage_count_at_one_microbatch_cuts_near_balance(stages):
    prof = bert_profile(layers=12, hidden=512, seq=128, vocab=8000, batch_size=16)
    cluster = ClusterSpec.from_flags(1, stages, "16GiB")
    report = make_plan(prof, cluster, replicas=[1] * stages, microbatches=1)
    assert stage_balance(prof, report.plan, report.cost_model) <= 1.25


def test_a_two_head_model_gets_only_plans_its_executor_accepts():
    """A partial loss crosses from the first head to the final sum: the runtime's Executor (which
    calls the same redistribution check) refuses a cut between unequal replica counts there, and no
    plan the planner returns for 1 x 3 or 2 x 2 GPUs makes one."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from rannc_cli.graph.blocks import build_blocks
    from rannc_cli.graph.capture import capture
    from rannc_cli.graph.stages import build_stages
    from rannc_cli.profiler.build import profile_model
    from rannc_cli.runtime.executor import Executor
    from rannc_cli.runtime.groups import Layout
    from rannc_cli.runtime.planning import even_plan

    class TwoHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.h1, self.l2, self.h2 = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(16, 16), nn.Linear(16, 4)

        def forward(self, x, y):
            a = torch.relu(self.l1(x))
            partial = F.cross_entropy(self.h1(a), y)
            return partial + F.cross_entropy(self.h2(torch.relu(self.l2(a))), y)

    model, x, y = TwoHead(), torch.randn(8, 8), torch.randint(0, 4, (8,))
    prof, _ = profile_model(model, (x, y), mode="estimated", use_cache=False)
    bg = build_blocks(capture(model, (x, y)))
    n = len(bg.blocks)
    assert len(prof.blocks) == n
    blocked = [b for b in range(1, n) if cut_blocked(prof)[b]]
    assert blocked, "the partial loss crosses some boundary"

    def executor_accepts(plan, nodes: int = 1, gpus: int = 3) -> bool:
        stages = build_stages(bg, [i for i, st in enumerate(plan.stages) for _ in st.blocks])
        layout = Layout.from_plan(plan, nodes * gpus, gpus)
        try:
            Executor(bg, stages, layout, 0, torch.device("cpu"), plan.schedule, plan.microbatches,
                     [st.checkpoint for st in plan.stages])
        except RanncError as exc:
            assert "without a batch dimension" in exc.message
            return False
        return True

    bad = even_plan(n, [1, 2], 1, 8, bounds=[blocked[0]])
    assert not executor_accepts(bad)
    with pytest.raises(RanncError, match="without a batch dimension"):
        check_plan_runs(prof, bad)
    for nodes, gpus in ((1, 3), (2, 2)):
        for kw in ({"stages": 2}, {"all_devices": True}):
            report = make_plan(prof, ClusterSpec.from_flags(nodes, gpus, "16GiB"), with_baselines=False, **kw)
            for plan, _ in [(report.plan, report.simulation), *report.alternatives]:
                assert executor_accepts(plan, nodes, gpus), plan


def test_transformer_lm_forced_stages_cut_near_balance(tmp_path):
    """examples/transformer_lm.py at one microbatch: --stages 2 used to give [blocks 0-0 | 1-49]."""
    import json

    from conftest import ROOT, run_cli
    from rannc_cli.profiler.format import Profile

    path = tmp_path / "tlm.yaml"
    res = run_cli("profile", str(ROOT / "examples" / "transformer_lm.py"), "--estimate", "--device-spec",
                  "V100-SXM2-16GB", "--no-cache", "--out", str(path))
    assert res.returncode == 0, res.stderr
    prof = Profile.load(path)
    for stages in (2, 3):
        res = run_cli("plan", "--profile", str(path), "--nodes", "1", "--gpus", str(stages), "--stages", str(stages),
                      "--microbatches", "1", "--json")
        assert res.returncode == 0, res.stderr
        data = json.loads(res.stdout)
        plan = candidate_like(data)
        cm = CostModel(prof, ClusterSpec.from_flags(1, stages, "16GiB"), data["batch_size"])
        assert len(plan.stages) == stages and stage_balance(prof, plan, cm) <= 1.25, data["stages"]


def candidate_like(data: dict):
    """A Plan from `rannc plan --json` output (stages, replicas, microbatches)."""
    from rannc_cli.planner.plan import Plan, StagePlan

    stages = [StagePlan(s["blocks"][0], s["blocks"][-1] + 1, s["replicas"], [tuple(d) for d in s["devices"]],
                        s["checkpoint"]) for s in data["stages"]]
    return Plan(data["schedule"], data["microbatches"], data["batch_size"], stages)
