"""`rannc run` end to end: in-process planning, deferred init, exact resume, faults, one-line errors.

Real worker processes over gloo (tests/runtime_worker.py), two or three per launch.
"""

from __future__ import annotations

import time

import torch

from runtime_cases import compare, load_result, train_reference
from test_runtime_equivalence import P, launch


def test_rank0_profiles_and_plans_in_process(tmp_path):
    """No plan given: rank 0 profiles and plans with the forced constraints, every rank follows;
    a model built under deferred_init materialises only its stage and, once loaded, trains exactly."""
    cases = [{"id": "mlp_planned", "model": "example_mlp", "options": {"quiet": False}},
             {"id": "tied_deferred", "model": "tied_weights", "deferred": True},
             {"id": "tied_deferred_even", "model": "tied_weights", "deferred": True, "options": P([1, 1], 2)}]
    proc = launch(tmp_path, cases, 2, "--stages", "2", "--microbatches", "2", "--schedule", "gpipe")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rannc: plan 2 stage(s)" in proc.stderr and "2 microbatch(es), gpipe" in proc.stderr
    for case in cases:
        got = load_result(tmp_path / "out" / f"{case['id']}.pt")
        bad, worst = compare(train_reference(case), got)
        assert not bad, f"{case['id']}: {bad[:3]}"
        assert worst < 1e-5
    planned = load_result(tmp_path / "out" / "tied_deferred.pt")  # the planner put every Linear on stage 0
    held = planned["held_by_rank"]  # parameter elements with storage on each rank
    assert min(held) < planned["total_numel"] <= sum(held), held
    even = load_result(tmp_path / "out" / "tied_deferred_even.pt")
    assert all(0 < h < even["total_numel"] for h in even["held_by_rank"]), even["held_by_rank"]


def test_sharded_checkpoint_resumes_the_exact_trajectory(tmp_path):
    case = {"id": "resume", "model": "fork_join", "optimizer": "adam", "steps": 6, "options": P([1, 1], 2)}
    full = launch(tmp_path / "a", [case], 2, worker_args=("--save-at", "3"))
    assert full.returncode == 0, full.stderr[-3000:]
    ckpt = tmp_path / "a" / "out" / "resume-ckpt"
    assert (ckpt / "plan.yaml").is_file() and (ckpt / "rank-0.pt").is_file() and (ckpt / "rank-1.pt").is_file()
    resumed_case = dict(case, start=3, steps=3, options={})  # the plan comes from the checkpoint
    resumed = launch(tmp_path / "b", [resumed_case], 2, worker_args=("--resume", str(ckpt)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_result(tmp_path / "a" / "out" / "resume.pt")
    b = load_result(tmp_path / "b" / "out" / "resume.pt")
    assert a["losses"][3:] == b["losses"], (a["losses"], b["losses"])  # bit for bit
    for k, v in a["state"].items():
        assert torch.equal(v, b["state"][k]), k
    bad, _ = compare(train_reference(case), a, keys=("losses", "state", "optimizer"))
    assert not bad, bad[:3]


def test_a_failing_rank_ends_the_job_with_its_error(tmp_path):
    case = {"id": "fault", "model": "example_mlp", "options": P([1, 1, 1], 2)}
    t0 = time.monotonic()
    logs = tmp_path / "logs"
    proc = launch(tmp_path, [case], 3, "--log-dir", str(logs), env={"RANNC_RUNTIME_TIMEOUT": "30"},
                  worker_args=("--fail-rank", "1"))
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"rannc run: rank 1 failed first (exit code 1) (see {logs / 'rank-1.log'})" in proc.stderr
    assert elapsed < 90
    # --log-dir: every rank's output in rank-<R>.log, only rank 0's on the terminal
    rank1 = (logs / "rank-1.log").read_text()
    assert "Traceback (most recent call last)" in rank1 and "injected failure on rank 1 at step 2" in rank1
    assert "injected failure" not in proc.stderr and "[rank " not in proc.stderr
    assert sorted(p.name for p in logs.iterdir()) == ["rank-0.log", "rank-1.log", "rank-2.log"]
    for line in (logs / "rank-0.log").read_text().splitlines():  # rank 0's output: log and terminal
        assert line in proc.stdout + proc.stderr, line


def test_a_hanging_rank_is_given_up_on_after_the_timeout(tmp_path):
    case = {"id": "hang", "model": "example_mlp", "options": P([1, 1], 2)}
    t0 = time.monotonic()
    proc = launch(tmp_path, [case], 2, env={"RANNC_RUNTIME_TIMEOUT": "8"}, worker_args=("--hang-rank", "1"))
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert "lost contact with the other ranks" in proc.stderr, proc.stderr[-2000:]
    assert elapsed < 60


def test_a_bad_plan_is_one_error_line_on_every_rank(tmp_path):
    proc = launch(tmp_path, [{"id": "bad", "model": "example_mlp", "options": P([3], 1)}], 2)
    assert proc.returncode == 2
    assert "error: the plan puts stage 0 on devices" in proc.stderr
    assert "Traceback" not in proc.stderr
