"""The 'zb' split of the backward in the profile (format version 2) and in the cost model."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn as nn
import yaml

from rannc_cli.errors import RanncError
from rannc_cli.planner.cluster import ClusterSpec, Link
from rannc_cli.planner.costmodel import W_SHARE, CostModel
from rannc_cli.planner.plan import Plan, StagePlan
from rannc_cli.planner.refine import _range_arrays
from rannc_cli.planner.simulate import simulate
from rannc_cli.planner.synthetic import bert_profile
from rannc_cli.profiler.build import profile_model
from rannc_cli.profiler.format import FORMAT_VERSION, BlockClass, BlockCost, Profile

LINKS = {"intra_node": Link(10e9, 1e-5), "inter_node": Link(1e9, 1e-4),
         "allreduce_intra": Link(5e9, 2e-5), "allreduce_inter": Link(5e8, 2e-4)}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 4)

    def forward(self, x, y):
        return nn.functional.cross_entropy(self.b(torch.relu(self.a(x))), y)


def _batch():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(8, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)


def _load(tmp_path, data) -> Profile:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return Profile.load(path)


def test_split_fields_round_trip_and_interpolate(tmp_path):
    prof, _ = profile_model(Net(), _batch(), {}, mode="estimated", device_spec="CPU-generic", use_cache=False,
                            microbatch_sizes=[2, 8])
    assert prof.version == FORMAT_VERSION == 2
    again = _load(tmp_path, prof.to_dict())
    assert again.to_dict() == prof.to_dict() and again.content_hash() == prof.content_hash()
    for c in again.classes:
        for x in c.costs:
            assert x.has_split
    cls = BlockClass(0, "sig", [0], [BlockCost(2, 1.0, 2.0, 3.0, 10, 1, backward_input_seconds=1.0,
                                                backward_weight_seconds=1.5),
                                      BlockCost(4, 2.0, 4.0, 6.0, 20, 2, backward_input_seconds=3.0,
                                                backward_weight_seconds=2.5)])
    mid = cls.cost_at(3)
    assert (mid.backward_input_seconds, mid.backward_weight_seconds) == pytest.approx((2.0, 2.0))
    assert cls.cost_at(8).backward_input_seconds == pytest.approx(7.0)
    half = BlockClass(0, "sig", [0], [BlockCost(2, 1.0, 2.0, 3.0, 10, 1), cls.costs[1]])
    assert not half.cost_at(3).has_split  # one size without the split: none blended


def test_version_1_profiles_load_unchanged(tmp_path):
    prof, _ = profile_model(Net(), _batch(), {}, mode="estimated", device_spec="CPU-generic", use_cache=False)
    data = prof.to_dict()
    data["version"] = 1
    for c in data["classes"]:
        for x in c["costs"]:
            del x["backward_input_seconds"], x["backward_weight_seconds"]
    old = _load(tmp_path, data)
    assert old.version == 1 and not any(x.has_split for c in old.classes for x in c.costs)
    assert old.to_dict() == data  # written back as it was: no split fields appear
    expect = {k: v for k, v in data.items() if k not in ("created", "key")}
    assert old.content_hash() == hashlib.sha256(json.dumps(expect, sort_keys=True).encode()).hexdigest()[:16]
    cm = CostModel(old, ClusterSpec(1, 2, 8 << 30, LINKS))
    bs, ws = cm.split_arrays(4)
    bwd = cm.block_arrays(4)[1]
    assert (bs + ws).tolist() == pytest.approx(bwd.tolist())
    assert ws.tolist() == pytest.approx((bwd * cm.default_weight_share()).tolist())


@pytest.mark.parametrize("edit, message", [
    (lambda x: x.pop("backward_weight_seconds"), "must both be given"),
    (lambda x: x.update(backward_input_seconds=-1.0), "must both be given"),
])
def test_broken_split_fields_are_refused(tmp_path, edit, message):
    prof, _ = profile_model(Net(), _batch(), {}, mode="estimated", device_spec="CPU-generic", use_cache=False)
    data = prof.to_dict()
    edit(data["classes"][0]["costs"][0])
    with pytest.raises(RanncError, match=message) as info:
        _load(tmp_path, data)
    assert "\n" not in info.value.one_line()
    data = prof.to_dict()
    data["version"] = 3
    with pytest.raises(RanncError, match="reads versions 1, 2"):
        _load(tmp_path, data)


def test_estimated_split_adds_up_to_the_backward():
    prof, _ = profile_model(Net(), _batch(), {}, mode="estimated", device_spec="CPU-generic", use_cache=False)
    first = prof.block_cost(0, 8)  # reads the user input only: no input gradient, all of it is W
    assert first.backward_input_seconds == 0.0 and first.backward_weight_seconds == pytest.approx(first.backward_seconds)
    for c in prof.classes:
        for x in c.costs:
            assert x.backward_input_seconds + x.backward_weight_seconds == pytest.approx(x.backward_seconds)
    with_input = [x for c in prof.classes for x in c.costs if x.backward_input_seconds > 0]
    assert with_input  # a later block's input wants a gradient


def test_measured_split_is_recorded_and_leaves_grads_alone():
    net = Net()
    prof, _ = profile_model(net, _batch(), {}, mode="measured", use_cache=False, microbatch_sizes=[4, 8])
    assert all(x.has_split and x.backward_input_seconds >= 0 and x.backward_weight_seconds >= 0
               for c in prof.classes for x in c.costs)
    assert all(p.grad is None for p in net.parameters())
    assert any(x.backward_weight_seconds > 0 for c in prof.classes for x in c.costs)


def _measured_like(prof: Profile, b_factor: float, w_factor: float) -> Profile:
    """``prof`` with a split of B = b_factor x backward, W = w_factor x backward in every cost."""
    for c in prof.classes:
        for x in c.costs:
            x.backward_input_seconds = b_factor * x.backward_seconds
            x.backward_weight_seconds = w_factor * x.backward_seconds
    return prof


def test_zb_stage_times_use_the_measured_split():
    plain = bert_profile(layers=4, hidden=256, seq=64, vocab=1000, batch_size=16)
    split = _measured_like(bert_profile(layers=4, hidden=256, seq=64, vocab=1000, batch_size=16), 0.8, 0.55)
    cluster = ClusterSpec(1, 4, 8 << 30, LINKS)
    cm_old, cm = CostModel(plain, cluster), CostModel(split, cluster)
    shard, blocks = 4, (1, 2, 3)
    bwd = sum(split.block_cost(b, shard).backward_seconds for b in blocks)
    fwd = sum(split.block_cost(b, shard).forward_seconds for b in blocks)
    sc = cm.stage_cost(1, 4, 1, 4, "intra", "intra", 2, False, split_weight=True)
    assert sc.compute_backward == pytest.approx(1.35 * bwd) and sc.weight == pytest.approx(0.55 * bwd)
    assert sc.backward == pytest.approx(1.35 * bwd + sc.p2p_backward) and sc.grad_seconds == pytest.approx(0.55 * bwd)
    ck = cm.stage_cost(1, 4, 1, 4, "intra", "intra", 2, True, split_weight=True)
    assert ck.compute_backward == pytest.approx(fwd + 1.35 * bwd) and ck.weight == pytest.approx(0.55 * bwd)
    assert cm.stage_cost(1, 4, 1, 4, "intra", "intra", 2, False).compute_backward == pytest.approx(bwd)  # 1f1b: plain
    old = cm_old.stage_cost(1, 4, 1, 4, "intra", "intra", 2, False, split_weight=True)
    assert old.compute_backward == pytest.approx(bwd) and old.weight == pytest.approx(W_SHARE * bwd)  # no split: as before
    assert cm.weight_share(shard)[1] == pytest.approx(0.55 / 1.35)
    # the boundary refinement's range arrays price the same stage the same way
    f, b, rc, _a, wt, _pk = _range_arrays(cm, list(range(cm.n + 1)), shard, True)
    assert (b[1, 4], rc[1, 4], wt[1, 4]) == pytest.approx((1.35 * bwd, fwd + 1.35 * bwd, 0.55 * bwd))
    # a first stage's inputs want no gradient: its B is empty, its W the whole plain backward
    n = cm.n
    assert not cm.input_reached(0).any() and cm.input_reached(2)[2:].all()
    first = cm.stage_cost(0, 2, 1, 4, None, "intra", 2, False, split_weight=True)
    plain01 = sum(split.block_cost(b, shard).backward_seconds for b in (0, 1))
    assert first.compute_backward == pytest.approx(plain01) and first.weight == pytest.approx(plain01)
    # the simulation's B op takes B (+ the gradient send), its W op W
    plan = Plan("zb", 4, 16, [StagePlan(0, 2, 1, [(0, 0)]), StagePlan(2, n, 1, [(0, 1)])])
    sim = simulate(plan, cm)
    bs = sum(split.block_cost(k, 4).backward_input_seconds for k in range(2, n))
    ws = sum(split.block_cost(k, 4).backward_weight_seconds for k in range(2, n))
    for s, (b_op, w_op) in enumerate(((0.0, plain01), (bs + sim.costs[1].p2p_backward, ws))):
        assert [e.end - e.start for e in sim.events if e.stage == s and e.kind == "B"] == pytest.approx([b_op] * 4)
        assert [e.end - e.start for e in sim.events if e.stage == s and e.kind == "W"] == pytest.approx([w_op] * 4)
