"""`rannc submit` end to end on the real Slurm testbed (munge, slurmctld, slurmd n1 n2 n3, fake GPUs)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from testbed.scheduler import FAST, MLP_ARGS, SCRIPTS, job_folder, job_logs, make_profile, record, wait_file_text

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def mlp_profile(tmp_path_factory):
    return make_profile(tmp_path_factory.mktemp("slurm-prof"))


def _env(cluster, tmp_path, **extra) -> dict:
    return {**cluster.env, **FAST, "RANNC_LOGS_DIR": str(tmp_path / "logs"), **extra}


def _losses(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"^step \d+ loss ([0-9.]+)", text, flags=re.M)]


def test_profile_plan_train_two_nodes(slurm_cluster, tmp_path):
    """The whole flow: profiling job -> plan at the training job's start -> 2 nodes x 2 ranks -> COMPLETED."""
    env = _env(slurm_cluster, tmp_path)
    t0 = time.monotonic()
    res = run_cli("submit", str(ROOT / "examples" / "mlp.py"), "--scheduler", "slurm", "--nodes", "2", "--gpus", "2",
                  "--time", "10:00", "--wait", "--", *MLP_ARGS, cwd=tmp_path, env=env, timeout=300)
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stdout + res.stderr + job_logs(tmp_path / "logs") + slurm_cluster.logs()
    print(f"submit-to-COMPLETED on the Slurm testbed: {took:.1f} s")
    folder = job_folder(tmp_path / "logs")
    assert folder.stat().st_mode & 0o777 == 0o700
    rec = record(folder)
    ph = rec["phases"]
    assert [ph[p]["state"] for p in ("profile", "plan", "train")] == ["COMPLETED"] * 3
    show = slurm_cluster.run("scontrol", "show", "job", str(ph["train"]["scheduler_id"])).stdout
    assert show == "" or "NumNodes=2" in show
    assert {"profile.sh", "train.sh", "rank.sh", "profile.yaml", "plan.yaml", "job.yaml"} <= {p.name for p in folder.iterdir()}
    assert "nodes: 2" in (folder / "plan.yaml").read_text()
    for rank in range(4):
        losses = _losses((folder / "train" / f"rank-{rank}.log").read_text())
        assert len(losses) == 12, f"rank {rank}: {losses}"
        assert sum(losses[-3:]) < sum(losses[:3]), f"rank {rank}: loss did not decrease: {losses}"
    status = run_cli("status", rec["id"], cwd=tmp_path, env=env)
    assert status.returncode == 0 and "COMPLETED" in status.stdout and "predicted" in status.stdout
    logs = run_cli("logs", rec["id"], "--rank", "3", cwd=tmp_path, env=env)
    assert logs.returncode == 0 and "step 11 loss" in logs.stdout
    jobs = run_cli("jobs", cwd=tmp_path, env=env)
    assert rec["id"] in jobs.stdout and "COMPLETED" in jobs.stdout and "2x2" in jobs.stdout


def test_failing_rank_fails_the_job(slurm_cluster, tmp_path, mlp_profile):
    env = _env(slurm_cluster, tmp_path)
    t0 = time.monotonic()
    res = run_cli("submit", str(SCRIPTS / "raise_train.py"), "--scheduler", "slurm", "--nodes", "1", "--gpus", "2",
                  "--profile", str(mlp_profile), "--wait", cwd=tmp_path, env=env, timeout=120)
    took = time.monotonic() - t0
    assert res.returncode != 0
    assert "ended FAILED at train/rank-1.log" in res.stderr and "ValueError: boom from rank 1" in res.stderr
    assert "Traceback" not in res.stderr
    assert took < 40, f"a failed rank should end the job promptly, took {took:.0f} s (rank 0 alone would run 20 s)"
    folder = job_folder(tmp_path / "logs")
    rank1 = (folder / "train" / "rank-1.log").read_text()
    assert "Traceback (most recent call last)" in rank1 and "ValueError: boom from rank 1" in rank1
    assert "step 99" not in (folder / "train" / "rank-0.log").read_text()     # rank 0 was stopped, not left running
    status = run_cli("status", folder.name, cwd=tmp_path, env=env)
    assert "FAILED" in status.stdout and "failed at train/rank-1.log" in status.stdout


@pytest.mark.parametrize("sig", ["SIGSTOP", "SIGKILL"])
def test_a_stopped_or_killed_rank_is_the_one_named(slurm_cluster, tmp_path, mlp_profile, sig):
    """srun starts the ranks (no `rannc run`). SIGSTOP: rank 0 watches rank 1's heartbeat in
    train/heartbeat, names it and exits 3; srun ends the job. SIGKILL: srun reports the task. Either
    way `rannc status` names rank 1, not rank 0 that lost contact with it."""

    env = _env(slurm_cluster, tmp_path, RANNC_HANG_TIMEOUT_SECONDS="5", RANNC_RUNTIME_TIMEOUT="600")
    res = run_cli("submit", str(ROOT / "examples" / "mlp.py"), "--scheduler", "slurm", "--nodes", "2", "--gpus", "1",
                  "--profile", str(mlp_profile), "--", *MLP_ARGS, "--steps", "1000000", cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    folder = job_folder(tmp_path / "logs")
    wait_file_text(folder / "train" / "rank-1.log", "step 3 ", 240)
    pid = None
    for proc in Path("/proc").iterdir():
        try:
            penv = dict(i.split("=", 1) for i in (proc / "environ").read_text().split("\0") if "=" in i)
        except (OSError, ValueError):
            continue
        if penv.get("RANNC_JOB_DIR") == str(folder) and penv.get("RANK") == "1" and "python" in (proc / "cmdline").read_text():
            pid = int(proc.name)
    assert pid is not None
    import os

    os.kill(pid, getattr(signal, sig))
    try:
        rec = record(folder)
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            status = run_cli("status", rec["id"], cwd=tmp_path, env=env)
            if "FAILED" in status.stdout.splitlines()[0]:
                break
            time.sleep(1)
        assert "FAILED" in status.stdout.splitlines()[0], status.stdout + slurm_cluster.logs()
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if sig == "SIGSTOP":
        rank0 = (folder / "train" / "rank-0.log").read_text()
        assert "error: rank 1 stopped answering: its heartbeat has not changed for " in rank0, rank0[-2000:]
        assert "failed at train/rank-1.log: rank 1 stopped answering" in status.stdout, status.stdout
    else:
        assert "failed at train/rank-1.log: rank 1 ended first: Killed on n2 (srun)" in status.stdout, status.stdout


def test_cancel_running_job(slurm_cluster, tmp_path, mlp_profile):
    env = _env(slurm_cluster, tmp_path)
    res = run_cli("submit", str(SCRIPTS / "ckpt_train.py"), "--scheduler", "slurm", "--nodes", "1", "--gpus", "2",
                  "--profile", str(mlp_profile), "--", "--steps", "400", "--delay", "0.2", cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    folder = job_folder(tmp_path / "logs")
    wait_file_text(folder / "train" / "rank-0.log", "step 2 ", 60)
    tid = str(record(folder)["phases"]["train"]["scheduler_id"])
    res = run_cli("cancel", record(folder)["id"], cwd=tmp_path, env=env)
    assert res.returncode == 0 and f"cancelled train {tid}" in res.stdout, res.stdout + res.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = slurm_cluster.run("squeue", "-h", "-j", tid, "-t", "all", "-o", "%T").stdout.strip()
        if state in ("CANCELLED", ""):
            break
        time.sleep(0.3)
    assert state in ("CANCELLED", ""), state
    status = run_cli("status", record(folder)["id"], cwd=tmp_path, env=env)
    assert "CANCELLED" in status.stdout
    again = run_cli("cancel", record(folder)["id"], cwd=tmp_path, env=env)
    assert again.returncode == 0 and "nothing to cancel" in again.stdout


def _step_lines(text: str) -> list[tuple[int, str]]:
    return [(int(a), b) for a, b in re.findall(r"^step (\d+) loss ([0-9.]+)$", text, flags=re.M)]


def test_requeue_round_trip_resumes_from_checkpoint(slurm_cluster, tmp_path, mlp_profile):
    """The real runtime on examples/mlp.py: the time-limit warning (SIGUSR1 to the batch shell, as
    --signal=B:USR1@N sends it) makes every rank finish its step, checkpoint and exit 0; the job requeues
    itself, the next run resumes with the same plan, replays the steps already trained, and its losses
    equal an uninterrupted run's number by number (no step repeated or skipped)."""
    steps = 2500
    args = [*MLP_ARGS[2:], "--steps", str(steps)]
    env = _env(slurm_cluster, tmp_path, OMP_NUM_THREADS="1")
    res = run_cli("submit", str(ROOT / "examples" / "mlp.py"), "--scheduler", "slurm", "--nodes", "1", "--gpus", "2",
                  "--time", "30:00", "--profile", str(mlp_profile), "--", *args, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    folder = job_folder(tmp_path / "logs")
    rec = record(folder)
    tid = str(rec["phases"]["train"]["scheduler_id"])
    assert "#SBATCH --signal=B:USR1@" in (folder / "train.sh").read_text()
    wait_file_text(folder / "train" / "rank-1.log", "step 5 ", 120)
    plan_before = (folder / "plan.yaml").read_text()
    sig = slurm_cluster.run("scancel", "--signal=USR1", "--batch", tid)
    assert sig.returncode == 0, sig.stderr
    wait_file_text(folder / "train" / "rank-0.log", "checkpointed at step", 60)
    # Slurm holds a requeued job back for the credential lifetime (the testbed sets 10 s; 120 s by default).
    res = run_cli("status", rec["id"], cwd=tmp_path, env=env)
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and "COMPLETED" not in res.stdout.split("\n")[0]:
        time.sleep(0.5)
        res = run_cli("status", rec["id"], cwd=tmp_path, env=env)
    assert res.stdout.startswith(f"job {rec['id']} mlp: COMPLETED"), res.stdout + res.stderr
    assert "requeued 1x" in res.stdout
    assert (folder / "plan.yaml").read_text() == plan_before
    assert "requeueing job" in next(folder.glob("train/batch-*.log")).read_text()

    # the uninterrupted trajectory: the same plan, two local processes, no signal
    ref = subprocess.run([sys.executable, "-m", "rannc_cli.cli", "run", "--nproc", "2", "--plan",
                          str(folder / "plan.yaml"), str(ROOT / "examples" / "mlp.py"), "--", *args],
                         cwd=tmp_path, env={**env, "RANNC_CHECKPOINT_DIR": ""}, capture_output=True, text=True,
                         timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    reference = _step_lines(ref.stdout)
    assert [s for s, _ in reference] == list(range(steps))
    stops = set()
    for rank in (0, 1):
        text = (folder / "train" / f"rank-{rank}.log").read_text()
        first, _, second = text.partition("exiting for requeue")
        stopped = int(re.search(r"checkpointed at step (\d+)", first).group(1))
        stops.add(stopped)
        assert 5 < stopped < steps, stopped
        before = _step_lines(first)
        # the step that saw the signal completed and was checkpointed (its print comes after optimizer.step)
        assert before == reference[:stopped - 1], f"rank {rank}: first run differs from the reference"
        after = _step_lines(second)
        assert after == reference, f"rank {rank}: resumed run's losses differ from the uninterrupted run's"
        assert "checkpointed at step" not in second
    assert len(stops) == 1, f"ranks checkpointed at different steps: {stops}"
    rank0 = (folder / "train" / "rank-0.log").read_text()
    assert f"resumed at step {stops.pop()} from" in rank0 and "same plan, exact shards" in rank0
    assert not (folder / "checkpoints" / "rannc-preempted").exists()


def test_scheduler_rejection_is_one_clear_line(slurm_cluster, tmp_path, mlp_profile):
    site = tmp_path / "greedy.yaml"
    site.write_text("name: greedy\nscheduler: slurm\nnode_groups: [{name: g, count: 2, gpus: 4}]\n"
                    "submit:\n  directives: ['--gres=gpu:99']\n")
    env = _env(slurm_cluster, tmp_path)
    res = run_cli("submit", str(SCRIPTS / "ckpt_train.py"), "--site", str(site), "--nodes", "1", "--gpus", "1",
                  "--profile", str(mlp_profile), cwd=tmp_path, env=env)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode != 0 and len(lines) == 1, res.stderr
    assert lines[0].startswith("error: sbatch failed on local: sbatch: error:"), lines[0]


def test_validation_before_submitting(slurm_cluster, tmp_path):
    env = _env(slurm_cluster, tmp_path)
    script = str(SCRIPTS / "ckpt_train.py")
    cases = [(["--nodes", "3", "--gpus", "2"], "partition", "2 available node(s) with >= 2 GPUs, 3 asked"),
             (["--nodes", "1", "--gpus", "8"], None, "with >= 8 GPUs"),
             (["--nodes", "1", "--gpus", "1", "--queue", "nosuch"], None, "partition 'nosuch' does not exist")]
    for flags, _, needle in cases:
        res = run_cli("submit", script, "--scheduler", "slurm", *flags, cwd=tmp_path, env=env)
        assert res.returncode != 0 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())
    missing = run_cli("submit", script, "--scheduler", "slurm", "--nodes", "1", "--gpus", "1",
                      cwd=tmp_path, env={**env, "PATH": "/nonexistent"})
    assert missing.returncode != 0 and "not found" in missing.stderr and "Traceback" not in missing.stderr


def test_dry_run_prints_scripts_and_submits_nothing(slurm_cluster, tmp_path, mlp_profile):
    env = _env(slurm_cluster, tmp_path)
    before = slurm_cluster.run("squeue", "-h", "-t", "all", "-o", "%i").stdout
    res = run_cli("submit", str(ROOT / "examples" / "mlp.py"), "--scheduler", "slurm", "--nodes", "2", "--gpus", "2",
                  "--profile", str(mlp_profile), "--dry-run", "--", *MLP_ARGS, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    assert "#SBATCH --nodes=2" in res.stdout and "sbatch --parsable" in res.stdout and "stage(s)" in res.stdout
    assert "dry run: nothing submitted" in res.stdout
    assert slurm_cluster.run("squeue", "-h", "-t", "all", "-o", "%i").stdout == before
    assert not (tmp_path / "logs").exists()


@pytest.fixture
def tiny_partition(slurm_cluster):
    """A partition on n3 whose per-node CPU cap (MaxCPUsPerNode=1) and time limit (1 min) are smaller
    than what the tests ask: Slurm accepts such jobs and leaves them pending for ever."""
    res = slurm_cluster.run("scontrol", "create", "partitionname=tiny", "nodes=n3", "MaxCPUsPerNode=1", "MaxTime=1",
                            "State=UP")
    assert res.returncode == 0, res.stderr
    yield "tiny"
    slurm_cluster.run("scontrol", "delete", "partitionname=tiny")


def test_precheck_compares_cpus_per_node_and_time_limit(slurm_cluster, tmp_path, mlp_profile, tiny_partition):
    env = _env(slurm_cluster, tmp_path)
    script = str(SCRIPTS / "ckpt_train.py")
    cases = [(["--gpus", "2"], "partition tiny allows at most 1 CPU(s) per node (MaxCPUsPerNode), "
                               "2 task(s) x 1 CPU(s) per node asked"),
             (["--gpus", "1", "--time", "5:00"], "exceeds partition tiny's limit 1:00")]
    for flags, needle in cases:
        res = run_cli("submit", script, "--scheduler", "slurm", "--nodes", "1", "--queue", tiny_partition, *flags,
                      "--profile", str(mlp_profile), cwd=tmp_path, env=env)
        assert res.returncode != 0 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())


def test_job_slurm_can_never_start_ends_the_wait(slurm_cluster, tmp_path, mlp_profile, tiny_partition, monkeypatch):
    """Past the pre-check (switched off here), 2 tasks on a partition capped at 1 CPU per node stay
    PENDING with reason PartitionConfig: --wait ends non-zero with that reason instead of waiting for ever."""
    from rannc_cli.errors import RanncError
    from rannc_cli.scheduler.backends.slurm import SlurmBackend
    from rannc_cli.scheduler.submit import submit

    for key, value in _env(slurm_cluster, tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(SlurmBackend, "precheck", classmethod(lambda cls, spec, runner: []))
    t0 = time.monotonic()
    with pytest.raises(RanncError) as err:
        submit(script=SCRIPTS / "ckpt_train.py", script_args=[], nodes=1, gpus=2, scheduler="slurm",
               queue=tiny_partition, profile=mlp_profile, wait=True, quiet=True)
    took = time.monotonic() - t0
    assert "train phase can never start: PartitionConfig" in err.value.one_line(), err.value.one_line()
    assert took < 30, f"the wait should end within a few polls, took {took:.0f} s"
    rec = record(job_folder(tmp_path / "logs"))
    tid = str(rec["phases"]["train"]["scheduler_id"])
    assert rec["phases"]["train"]["never"] is True and rec["phases"]["train"]["reason"] == "PartitionConfig"
    status = run_cli("status", rec["id"], cwd=tmp_path, env=_env(slurm_cluster, tmp_path))
    assert "can never start: PartitionConfig" in status.stdout, status.stdout
    slurm_cluster.run("scancel", tid)
