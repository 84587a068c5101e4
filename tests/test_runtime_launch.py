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
    last = proc.stderr.strip().splitlines()[-1]
    # "(exit code 1)", or on a crowded machine, when rank 1 was still exiting as the others were
    # stopped, "(ValueError: injected failure ...; stopped while exiting)" from its heartbeat file
    assert last.startswith("rannc run: rank 1 failed first (") and f"(see {logs / 'rank-1.log'})" in last, last
    assert "(exit code 1)" in last or "(ValueError: injected failure on rank 1 at step 2; stopped while exiting)" in last
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
    assert proc.returncode == 3
    assert "lost contact with the other ranks" in proc.stderr, proc.stderr[-2000:]
    # its heartbeat thread still beat, but it was the one still running when rank 0 gave up on it
    assert "rannc run: rank 1 stopped answering first (the other ranks lost contact with it" in proc.stderr
    assert elapsed < 300  # not the hour it sleeps


def test_a_stopped_rank_is_named_within_the_hang_timeout(tmp_path):
    """SIGSTOP (a frozen process or node): its heartbeat stops; `rannc run` names it and ends the
    job after hang_timeout_seconds, not after the collectives' runtime_timeout."""
    case = {"id": "stop", "model": "example_mlp", "options": P([1, 1, 1], 2)}
    t0 = time.monotonic()
    proc = launch(tmp_path, [case], 3, "--log-dir", str(tmp_path / "logs"),
                  env={"RANNC_HANG_TIMEOUT_SECONDS": "5", "RANNC_RUNTIME_TIMEOUT": "600"},
                  worker_args=("--signal-rank", "1", "--signal", "STOP"))
    elapsed = time.monotonic() - t0
    assert proc.returncode == 3, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("rannc run: rank 1 stopped answering first (no heartbeat for "), proc.stderr[-3000:]
    assert "hang_timeout_seconds 5;" in last and "stopped or lost ranks 0, 2" in last
    assert elapsed < 300  # well before runtime_timeout (600 s) would have ended it


def test_a_killed_rank_is_named(tmp_path):
    case = {"id": "kill", "model": "example_mlp", "options": P([1, 1, 1], 2)}
    proc = launch(tmp_path, [case], 3, worker_args=("--signal-rank", "2", "--signal", "KILL"))
    assert proc.returncode == 137, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "rannc run: rank 2 failed first (killed by SIGKILL, exit code 137)"), proc.stderr[-3000:]


def test_without_our_launcher_the_previous_rank_names_a_stopped_rank(tmp_path):
    """srun and mpiexec start the ranks themselves: each rank watches the next one's heartbeat in
    RANNC_HEARTBEAT_DIR (the job scripts set it), so rank 1 names a stopped rank 0 and exits 3."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from rannc_cli.runtime.launcher import free_port
    from test_runtime_equivalence import WORKER

    (tmp_path / "cases.json").write_text(json.dumps([{"id": "stop0", "model": "example_mlp",
                                                        "options": P([1, 1], 2)}]))
    base = {**os.environ, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "RANNC_HEARTBEAT_DIR": str(tmp_path / "beats"),
            "RANNC_HANG_TIMEOUT_SECONDS": "5", "RANNC_RUNTIME_TIMEOUT": "600"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), "--cases", str(tmp_path / "cases.json"), "--out",
                               str(tmp_path / "out"), "--signal-rank", "0", "--signal", "STOP"],
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        _, err = procs[1].communicate(timeout=300)
        assert procs[1].returncode == 3, err[-3000:]
        assert "error: rank 0 stopped answering: its heartbeat has not changed for " in err, err[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.communicate()


def test_a_bad_plan_is_one_error_line_on_every_rank(tmp_path):
    proc = launch(tmp_path, [{"id": "bad", "model": "example_mlp", "options": P([3], 1)}], 2)
    assert proc.returncode == 2
    assert "error: the plan puts stage 0 on devices" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_planner_flags_of_issue_14_reach_the_runtime_planner(tmp_path):
    """`rannc run --schedule interleaved --virtual-stages 2 --zero 1`: rank 0 plans with them forced
    (4 processes, 2 groups of 2 replicas, 4 stages), every rank follows, and training equals one process."""
    cases = [{"id": "mlp_il_zero", "model": "example_mlp", "optimizer": "adam", "options": {"quiet": False}}]
    proc = launch(tmp_path, cases, 4, "--replicas", "2,2", "--schedule", "interleaved", "--virtual-stages", "2",
                  "--zero", "1", "--microbatches", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rannc: plan 4 stage(s)" in proc.stderr and "interleaved v=2, ZeRO-1" in proc.stderr, proc.stderr[-2000:]
    got = load_result(tmp_path / "out" / "mlp_il_zero.pt")
    bad, worst = compare(train_reference(cases[0]), got, keys=("losses", "state", "optimizer"))
    assert not bad, f"{bad[:3]}"
    assert worst < 1e-5


def test_contradicting_schedule_flags_fail_before_any_worker_starts(tmp_path):
    proc = launch(tmp_path, [{"id": "never", "model": "example_mlp"}], 2, "--virtual-stages", "2", "--schedule", "zb")
    assert proc.returncode == 2
    assert proc.stderr.count("error:") == 1 and "needs the interleaved schedule" in proc.stderr and "[rank" not in proc.stderr
