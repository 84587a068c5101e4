"""Plan files: round trip, validation, refusal on another model or cluster."""

from __future__ import annotations

import pytest
import yaml

from rannc_cli.errors import RanncError
from rannc_cli.planner.cluster import ClusterSpec
from rannc_cli.planner.planfile import check_plan, load_plan, save_plan
from rannc_cli.planner.planner import make_plan
from rannc_cli.planner.synthetic import bert_profile


@pytest.fixture(scope="module")
def made():
    prof = bert_profile(layers=4, hidden=256, seq=64, vocab=1000, batch_size=16)
    spec = ClusterSpec.from_flags(1, 4, "1GiB")
    return prof, spec, make_plan(prof, spec, with_baselines=False)


def test_round_trip(made, tmp_path):
    prof, spec, report = made
    path = save_plan(report.plan, tmp_path / "plan.yaml", [b.name for b in prof.blocks])
    again = load_plan(path)
    assert again.key() == report.plan.key()
    assert again.profile_hash == prof.content_hash() and again.cluster_fingerprint == spec.fingerprint
    check_plan(again, prof.content_hash(), spec.fingerprint, len(prof.blocks), spec)
    data = yaml.safe_load(path.read_text())
    assert data["format"] == "rannc-plan" and data["version"] == 2
    assert {"virtual_stages", "zero", "allreduce_overlap"} <= set(data)
    assert all({"blocks", "replicas", "devices", "checkpoint", "memory_bytes"} <= set(s) for s in data["stages"])


def test_refuses_other_model_and_other_cluster(made):
    prof, spec, report = made
    other = bert_profile(layers=5, hidden=256, seq=64, vocab=1000, batch_size=16)
    with pytest.raises(RanncError, match="another model"):
        check_plan(report.plan, other.content_hash(), spec.fingerprint, len(other.blocks))
    bigger = ClusterSpec.from_flags(2, 4, "1GiB")
    with pytest.raises(RanncError, match="was made for 1 x 4 GPUs"):
        check_plan(report.plan, prof.content_hash(), bigger.fingerprint, len(prof.blocks))


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(format="other"), "not a rannc plan"),
    (lambda d: d.update(version=9), "version 9"),
    (lambda d: d["stages"][0].pop("replicas"), "malformed"),
    (lambda d: d["stages"][0].update(blocks=[0, 2]), "consecutive"),
])
def test_broken_files_give_one_clear_error(made, tmp_path, edit, message):
    prof, spec, report = made
    path = save_plan(report.plan, tmp_path / "plan.yaml")
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RanncError, match=message):
        load_plan(path)


def test_missing_file():
    with pytest.raises(RanncError, match="does not exist"):
        load_plan("/nonexistent/plan.yaml")


def test_gpu_used_twice_is_refused(tmp_path):
    from rannc_cli.planner.plan import Plan, StagePlan

    plan = Plan("1f1b", 2, 8, [StagePlan(0, 2, 1, [(0, 0)]), StagePlan(2, 4, 1, [(0, 0)])], "h", "f")
    path = save_plan(plan, tmp_path / "p.yaml")
    with pytest.raises(RanncError, match="used by more than one replica"):
        load_plan(path)


def test_version_1_file_loads_with_the_defaults(made, tmp_path):
    prof, spec, report = made
    path = save_plan(report.plan, tmp_path / "plan.yaml")
    data = yaml.safe_load(path.read_text())
    for key in ("virtual_stages", "zero", "allreduce_overlap"):
        data.pop(key)
    data["version"] = 1
    path.write_text(yaml.safe_dump(data))
    old = load_plan(path)
    assert (old.virtual_stages, old.zero, old.allreduce_overlap) == (1, 0, False)
    assert [(s.start, s.end, s.replicas) for s in old.stages] == [(s.start, s.end, s.replicas) for s in report.plan.stages]


def _interleaved(devices_of_stage_3):
    from rannc_cli.planner.plan import Plan, StagePlan

    devs = [[(0, 0), (0, 1)], [(0, 2), (0, 3)], [(0, 0), (0, 1)], devices_of_stage_3]
    return Plan("interleaved", 4, 16, [StagePlan(i, i + 1, 2, d) for i, d in enumerate(devs)], "h", "f",
                virtual_stages=2, zero=1, allreduce_overlap=True)


def test_interleaved_device_rule_round_trips(tmp_path):
    plan = _interleaved([(0, 2), (0, 3)])
    again = load_plan(save_plan(plan, tmp_path / "p.yaml"))
    assert again.key() == plan.key() and again.groups == 2 and again.devices_used == 4


@pytest.mark.parametrize("devs,edit,message", [
    ([(0, 3), (0, 2)], None, "must run on exactly stage 1's devices"),
    ([(0, 4), (0, 5)], None, "must run on exactly stage 1's devices"),
    ([(0, 2), (0, 3)], lambda d: d.update(schedule="1f1b"), "virtual_stages 2 needs schedule interleaved"),
    ([(0, 2), (0, 3)], lambda d: d.update(virtual_stages=3), "not a multiple of 3"),
    ([(0, 2), (0, 3)], lambda d: d.update(zero=2), "zero 2 must be 0 or 1"),
    ([(0, 2), (0, 3)], lambda d: d.update(allreduce_overlap="yes"), "allreduce_overlap must be true or false"),
])
def test_interleaved_rule_is_enforced(tmp_path, devs, edit, message):
    path = save_plan(_interleaved(devs), tmp_path / "p.yaml")
    if edit is not None:
        data = yaml.safe_load(path.read_text())
        edit(data)
        path.write_text(yaml.safe_dump(data))
    with pytest.raises(RanncError, match=message):
        load_plan(path)
