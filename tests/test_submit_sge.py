"""`rannc submit --scheduler sge` end to end on a real Grid Engine (sge_qmaster + sge_execd, fake gpu complex)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from testbed.scheduler import FAST, MLP_ARGS, SCRIPTS, job_folder, job_logs, make_profile, record, wait_file_text

pytestmark = pytest.mark.gridengine


@pytest.fixture(scope="module")
def mlp_profile(tmp_path_factory):
    return make_profile(tmp_path_factory.mktemp("sge-prof"))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """examples/mlp.py's losses as one plain process prints them (the reference every job must match)."""
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "mlp.py"), *MLP_ARGS], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path_factory.mktemp("sge-ref"),
                         env={k: v for k, v in os.environ.items() if not k.startswith("RANNC_")})
    assert out.returncode == 0, out.stderr[-2000:]
    return _losses(out.stdout)


def _env(cluster, tmp_path, **extra) -> dict:
    return {**cluster.env, **FAST, "RANNC_LOGS_DIR": str(tmp_path / "logs"), **extra}


def _losses(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"^step \d+ loss ([0-9.]+)", text, flags=re.M)]


def _assert_equal_losses(folder: Path, ranks: int, reference: list[float]) -> None:
    assert len(reference) == 12
    for rank in range(ranks):
        got = _losses((folder / "train" / f"rank-{rank}.log").read_text())
        assert len(got) == len(reference), f"rank {rank}: {got}"
        worst = max(abs(a - b) for a, b in zip(got, reference))
        assert worst <= 2e-4, f"rank {rank}: losses {got} differ from one process's {reference} (by {worst})"


def test_profile_plan_train_on_grid_engine(gridengine, tmp_path, one_process):
    """Profiling job -> -hold_jid training job (plan at its start) -> 2 ranks -> COMPLETED, the losses
    of one plain process number by number."""
    env = _env(gridengine, tmp_path)
    t0 = time.monotonic()
    res = run_cli("submit", str(ROOT / "examples" / "mlp.py"), "--scheduler", "sge", "--nodes", "1", "--gpus", "2",
                  "--time", "10:00", "--wait", "--", *MLP_ARGS, cwd=tmp_path, env=env, timeout=300)
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stdout + res.stderr + job_logs(tmp_path / "logs") + gridengine.logs()
    print(f"submit-to-COMPLETED on the Grid Engine testbed: {took:.1f} s")
    folder = job_folder(tmp_path / "logs")
    rec = record(folder)
    ph = rec["phases"]
    assert [ph[p]["state"] for p in ("profile", "plan", "train")] == ["COMPLETED"] * 3
    acct = gridengine.run("qacct", "-j", str(ph["train"]["scheduler_id"])).stdout
    assert re.search(r"^granted_pe\s+smp", acct, flags=re.M) and re.search(r"^exit_status\s+0", acct, flags=re.M)
    assert "-l gpu=2" in (folder / "train.sh").read_text()
    _assert_equal_losses(folder, 2, one_process)
    batch = next(folder.glob("train/batch-*.log")).read_text()
    assert f"on 1 host(s) ({gridengine.host} )" in batch
    status = run_cli("status", rec["id"], cwd=tmp_path, env=env)
    assert status.returncode == 0 and "COMPLETED" in status.stdout and "predicted" in status.stdout
    logs = run_cli("logs", rec["id"], "--rank", "1", cwd=tmp_path, env=env)
    assert logs.returncode == 0 and "step 11 loss" in logs.stdout


def test_qrsh_inherit_ranks(gridengine, tmp_path, mlp_profile, one_process):
    """Ranks started one qrsh -inherit each onto the PE_HOSTFILE hosts (the multi-host path, here on one host)."""
    site = tmp_path / "ge-qrsh.yaml"
    site.write_text("name: ge-qrsh\nscheduler: sge\nnode_groups: [{name: g, count: 1, gpus: 4}]\n"
                    "submit:\n  sge: {launcher: qrsh}\n")
    env = _env(gridengine, tmp_path)
    res = run_cli("submit", str(ROOT / "examples" / "mlp.py"), "--site", str(site), "--nodes", "1", "--gpus", "2",
                  "--profile", str(mlp_profile), "--wait", "--", *MLP_ARGS, cwd=tmp_path, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr + job_logs(tmp_path / "logs") + gridengine.logs()
    folder = job_folder(tmp_path / "logs")
    assert "-inherit" in (folder / "train.sh").read_text() and "rannc_cli.cli run" not in (folder / "train.sh").read_text()
    _assert_equal_losses(folder, 2, one_process)


def test_failing_rank_is_named(gridengine, tmp_path, mlp_profile):
    env = _env(gridengine, tmp_path)
    t0 = time.monotonic()
    res = run_cli("submit", str(SCRIPTS / "raise_train.py"), "--scheduler", "sge", "--nodes", "1", "--gpus", "2",
                  "--profile", str(mlp_profile), "--wait", cwd=tmp_path, env=env, timeout=120)
    took = time.monotonic() - t0
    assert res.returncode != 0
    assert "ended FAILED at train/rank-1.log" in res.stderr and "ValueError: boom from rank 1" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert took < 40, f"a failed rank should end the job promptly, took {took:.0f} s (rank 0 alone would run 20 s)"
    folder = job_folder(tmp_path / "logs")
    assert "step 99" not in (folder / "train" / "rank-0.log").read_text()
    status = run_cli("status", folder.name, cwd=tmp_path, env=env)
    assert "FAILED" in status.stdout and "failed at train/rank-1.log" in status.stdout


def test_cancel_ends_both_phases(gridengine, tmp_path):
    """rannc cancel while the profiling job runs: both phases CANCELLED, the training job never starts."""
    env = _env(gridengine, tmp_path)
    res = run_cli("submit", str(ROOT / "examples" / "mlp.py"), "--scheduler", "sge", "--nodes", "1", "--gpus", "2",
                  "--no-cache", "--", *MLP_ARGS, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    folder = job_folder(tmp_path / "logs")
    rec = record(folder)
    pid, tid = (str(rec["phases"][p]["scheduler_id"]) for p in ("profile", "train"))
    res = run_cli("cancel", rec["id"], cwd=tmp_path, env=env)
    assert res.returncode == 0 and f"cancelled train {tid}, profile {pid}" in res.stdout, res.stdout + res.stderr
    gridengine.wait_gone(pid, 30)
    gridengine.wait_gone(tid, 30)
    status = run_cli("status", rec["id"], cwd=tmp_path, env=env)
    assert re.search(r"^profile\s+\d+\s+CANCELLED", status.stdout, flags=re.M), status.stdout
    assert re.search(r"^train\s+\d+\s+CANCELLED", status.stdout, flags=re.M), status.stdout
    assert not list(folder.glob("train/batch-*.log")) and not list(folder.glob("train/rank-*.log"))
    again = run_cli("cancel", rec["id"], cwd=tmp_path, env=env)
    assert again.returncode == 0 and "nothing to cancel" in again.stdout


def test_training_does_not_run_after_its_profile_was_deleted(gridengine, tmp_path):
    """Grid Engine releases a -hold_jid successor even when the predecessor was qdel'ed: the training
    job must see that the profile did not succeed, train nothing, and end CANCELLED with the reason."""
    env = _env(gridengine, tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "rannc_cli.cli", "submit", str(ROOT / "examples" / "mlp.py"),
                             "--scheduler", "sge", "--nodes", "1", "--gpus", "2", "--no-cache", "--wait", "--",
                             *MLP_ARGS], cwd=tmp_path, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            folders = [p for p in (tmp_path / "logs").glob("*") if (p / "job.yaml").is_file()] \
                if (tmp_path / "logs").is_dir() else []
            if folders and record(folders[0])["phases"]["train"].get("scheduler_id"):
                break
            time.sleep(0.2)
        folder = job_folder(tmp_path / "logs")
        pid = str(record(folder)["phases"]["profile"]["scheduler_id"])
        assert gridengine.run("qdel", pid).returncode == 0
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, out + err
    assert "ended CANCELLED" in err, out + err
    batch = next(folder.glob("train/batch-*.log")).read_text()
    assert f"the profiling job {pid} did not succeed" in batch, batch
    assert not list(folder.glob("train/rank-*.log")) and not (folder / "plan.yaml").exists()
    status = run_cli("status", folder.name, cwd=tmp_path, env=env)
    assert "its dependency (the profiling job) did not succeed" in status.stdout, status.stdout


def _step_lines(text: str) -> list[tuple[int, str]]:
    return [(int(a), b) for a, b in re.findall(r"^step (\d+) loss ([0-9.]+)$", text, flags=re.M)]


def _signal_job(cluster, job_id: str, sig: int = 10) -> None:
    """Send ``sig`` to the job's whole process group, as Grid Engine delivers s_rt's SIGUSR1."""
    pidfile = next(Path(cluster.base, "spool", "execd").glob(f"*/active_jobs/{job_id}.1/job_pid"))
    os.killpg(os.getpgid(int(pidfile.read_text().split()[0])), sig)


def test_soft_limit_warning_reruns_and_resumes(gridengine, tmp_path, mlp_profile):
    """A real s_rt: --time 0:30 with a 15 s warning -> -l h_rt=0:00:30 -l s_rt=0:00:15. Grid Engine sends
    SIGUSR1 at 15 s, the ranks (a torch-free stand-in that checkpoints like the runtime) save and stop,
    the job script exits 99, Grid Engine reruns the job, and the rerun resumes and COMPLETES."""
    env = _env(gridengine, tmp_path, RANNC_REQUEUE_SIGNAL_SECONDS="15")
    t0 = time.monotonic()
    res = run_cli("submit", str(SCRIPTS / "ckpt_train.py"), "--scheduler", "sge", "--nodes", "1", "--gpus", "2",
                  "--time", "0:30", "--profile", str(mlp_profile), "--wait", "--", "--steps", "200", "--delay", "0.1",
                  cwd=tmp_path, env=env, timeout=180)
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stdout + res.stderr
    folder = job_folder(tmp_path / "logs")
    script = (folder / "train.sh").read_text()
    assert "#$ -l s_rt=0:00:15" in script and "#$ -l h_rt=0:00:30" in script and "#$ -r y" in script
    batch = next(folder.glob("train/batch-*.log")).read_text()
    assert "SIGUSR1 (time limit ahead)" in batch and "exit 99 makes Grid Engine rerun job" in batch, batch
    assert "run 1 of job" in batch
    for rank in (0, 1):
        log = (folder / "train" / f"rank-{rank}.log").read_text()
        stopped = int(re.search(r"checkpointed at step (\d+)", log).group(1))
        assert f"resumed at step {stopped} restart 1" in log and log.rstrip().endswith("done"), log
    rec = record(folder)
    acct = gridengine.run("qacct", "-j", str(rec["phases"]["train"]["scheduler_id"])).stdout
    assert re.search(r"^failed\s+25\s*: rescheduling", acct, flags=re.M), acct
    assert rec["phases"]["train"].get("restarts") == 1
    print(f"s_rt warning -> rerun -> COMPLETED: {took:.1f} s")


def test_warning_checkpoint_rerun_resumes_the_runtime(gridengine, tmp_path, mlp_profile):
    """The real runtime on examples/mlp.py: the warning (SIGUSR1 to the job's process group, as s_rt
    delivers it, sent once the ranks train) makes every rank finish its step, checkpoint and exit 0; the
    job script exits 99, Grid Engine reruns it, and the rerun resumes with the same plan: its losses equal
    an uninterrupted run's number by number."""
    steps = 120
    args = [*MLP_ARGS[2:], "--steps", str(steps)]
    env = _env(gridengine, tmp_path, OMP_NUM_THREADS="1")
    res = run_cli("submit", str(ROOT / "examples" / "mlp.py"), "--scheduler", "sge", "--nodes", "1", "--gpus", "2",
                  "--time", "30:00", "--profile", str(mlp_profile), "--", *args, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    folder = job_folder(tmp_path / "logs")
    rec = record(folder)
    tid = str(rec["phases"]["train"]["scheduler_id"])
    wait_file_text(folder / "train" / "rank-1.log", "step 5 ", 120)
    plan_before = (folder / "plan.yaml").read_text()
    _signal_job(gridengine, tid)
    wait_file_text(folder / "train" / "rank-0.log", "checkpointed at step", 60)
    res = run_cli("status", rec["id"], cwd=tmp_path, env=env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not re.search(r": (COMPLETED|FAILED|CANCELLED|TIMEOUT)", res.stdout.split("\n")[0]):
        time.sleep(0.5)
        res = run_cli("status", rec["id"], cwd=tmp_path, env=env)
    assert res.stdout.startswith(f"job {rec['id']} mlp: COMPLETED"), res.stdout + res.stderr
    assert "requeued 1x" in res.stdout, res.stdout
    assert (folder / "plan.yaml").read_text() == plan_before

    ref = subprocess.run([sys.executable, "-m", "rannc_cli.cli", "run", "--nproc", "2", "--plan",
                          str(folder / "plan.yaml"), str(ROOT / "examples" / "mlp.py"), "--", *args],
                         cwd=tmp_path, env={**env, "RANNC_CHECKPOINT_DIR": ""}, capture_output=True, text=True,
                         timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    reference = _step_lines(ref.stdout)
    assert [s for s, _ in reference] == list(range(steps))
    stops = set()
    for rank in (0, 1):
        first, _, second = (folder / "train" / f"rank-{rank}.log").read_text().partition("exiting for requeue")
        stopped = int(re.search(r"checkpointed at step (\d+)", first).group(1))
        stops.add(stopped)
        assert 5 < stopped < steps, stopped
        # the step that saw the signal completed and was checkpointed (its print comes after optimizer.step)
        assert _step_lines(first) == reference[:stopped - 1], f"rank {rank}: first run differs from the reference"
        assert _step_lines(second) == reference, f"rank {rank}: resumed run's losses differ from the uninterrupted run's"
        assert "checkpointed at step" not in second
    assert len(stops) == 1, f"ranks checkpointed at different steps: {stops}"
    assert f"resumed at step {stops.pop()} from" in (folder / "train" / "rank-0.log").read_text()


def test_precheck_refuses_what_grid_engine_cannot_run(gridengine, tmp_path):
    env = _env(gridengine, tmp_path)
    script = str(SCRIPTS / "ckpt_train.py")
    cases = [(["--gpus", "8"], f"with >= 8 GPUs, 1 asked (GPUs per node there: {gridengine.gpus})"),
             (["--gpus", "1", "--nodes", "2"], "2 asked"),
             (["--gpus", "1", "--queue", "nosuch.q"], "queue 'nosuch.q' does not exist")]
    for flags, needle in cases:
        res = run_cli("submit", script, "--scheduler", "sge", *(["--nodes", "1"] if "--nodes" not in flags else []),
                      *flags, cwd=tmp_path, env=env)
        assert res.returncode != 0 and needle in res.stderr and "Traceback" not in res.stderr, (flags, res.stderr)
        assert len([line for line in res.stderr.splitlines() if line.strip()]) <= 2, res.stderr
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())
    missing = run_cli("submit", script, "--scheduler", "sge", "--nodes", "1", "--gpus", "1", cwd=tmp_path,
                      env={**env, "PATH": "/nonexistent"})
    assert missing.returncode != 0 and "qsub not found" in missing.stderr and "Traceback" not in missing.stderr


def test_never_runnable_job_ends_the_wait(gridengine, tmp_path, mlp_profile, monkeypatch):
    """Past the pre-check (switched off here), a request no host can hold stays qw with Grid Engine's
    "cannot run ..." scheduling info; qalter -w v confirms it can never run, so --wait ends
    non-zero with that reason instead of waiting forever."""
    from rannc_cli.errors import RanncError
    from rannc_cli.scheduler.backends.sge import SGEBackend
    from rannc_cli.scheduler.submit import submit

    for key, value in _env(gridengine, tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(SGEBackend, "precheck", classmethod(lambda cls, spec, runner: []))
    t0 = time.monotonic()
    with pytest.raises(RanncError) as err:
        submit(script=SCRIPTS / "ckpt_train.py", script_args=[], nodes=1, gpus=8, scheduler="sge",
               profile=mlp_profile, wait=True, quiet=True)
    took = time.monotonic() - t0
    message = err.value.one_line()
    assert "train phase can never start" in message and "cannot run" in message, message
    assert took < 30, f"the wait should end within a few polls, took {took:.0f} s"
    rec = record(job_folder(tmp_path / "logs"))
    tid = str(rec["phases"]["train"]["scheduler_id"])
    assert rec["phases"]["train"]["never"] is True
    assert gridengine.run("qstat", "-j", tid).returncode == 0         # still queued: the user decides
    res = run_cli("cancel", rec["id"], cwd=tmp_path, env=_env(gridengine, tmp_path))
    assert res.returncode == 0, res.stderr
    gridengine.wait_gone(tid, 30)


def test_dry_run_prints_scripts_and_submits_nothing(gridengine, tmp_path, mlp_profile):
    env = _env(gridengine, tmp_path)
    before = gridengine.run("qstat", "-u", "*").stdout
    res = run_cli("submit", str(ROOT / "examples" / "mlp.py"), "--scheduler", "sge", "--nodes", "1", "--gpus", "2",
                  "--time", "1:00:00", "--profile", str(mlp_profile), "--dry-run", "--", *MLP_ARGS,
                  cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    assert "#$ -pe smp 2" in res.stdout and "#$ -l gpu=2" in res.stdout and "#$ -l h_rt=1:00:00" in res.stdout
    assert "qsub -terse -j y -o" in res.stdout and "stage(s)" in res.stdout and "not checked" not in res.stdout
    assert "dry run: nothing submitted" in res.stdout
    assert gridengine.run("qstat", "-u", "*").stdout == before
    assert not (tmp_path / "logs").exists()
