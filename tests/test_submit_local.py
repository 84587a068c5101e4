"""`rannc submit` on the local backend (real subprocesses), job management, bad input, hostile input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from testbed.scheduler import FAST, MLP_ARGS, SCRIPTS, job_folder, make_profile, record, wait_file_text


@pytest.fixture(scope="module")
def mlp_profile(tmp_path_factory):
    return make_profile(tmp_path_factory.mktemp("local-prof"))


def _env(tmp_path, **extra) -> dict:
    return {**FAST, "RANNC_LOGS_DIR": str(tmp_path / "logs"), **extra}


def test_readme_job_on_the_local_backend(tmp_path):
    """The README's command: profile job, plan, 2 local ranks, COMPLETED with the loss falling."""
    env = _env(tmp_path)
    res = run_cli("submit", str(ROOT / "examples" / "mlp.py"), "--nodes", "1", "--gpus", "2", "--wait", "--",
                  *MLP_ARGS, cwd=tmp_path, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "train: COMPLETED" in res.stdout
    folder = job_folder(tmp_path / "logs")
    assert folder.stat().st_mode & 0o777 == 0o700 and (folder / "job.yaml").stat().st_mode & 0o777 == 0o600
    rec = record(folder)
    assert rec["backend"] == "local" and rec["phases"]["profile"]["state"] == "COMPLETED"
    for rank in (0, 1):
        losses = [float(x) for x in re.findall(r"^step \d+ loss ([0-9.]+)", (folder / "train" / f"rank-{rank}.log")
                                               .read_text(), flags=re.M)]
        assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]), losses
    # job records survive: a fresh CLI process reads them back
    jobs = run_cli("jobs", "--json", cwd=tmp_path, env=env)
    rows = json.loads(jobs.stdout)
    assert [r["id"] for r in rows] == [rec["id"]] and rows[0]["state"] == "COMPLETED"
    status = run_cli("status", rec["id"][:4], cwd=tmp_path, env=env)
    assert "train" in status.stdout and "COMPLETED" in status.stdout and "predicted" in status.stdout
    logs = run_cli("logs", rec["id"], "--rank", "1", cwd=tmp_path, env=env)
    assert "step 11 loss" in logs.stdout
    prof = run_cli("logs", rec["id"], "--phase", "profile", cwd=tmp_path, env=env)
    assert "profile written to" in prof.stdout
    # the second submission of the same script reuses the cached profile and plans here
    again = run_cli("submit", str(ROOT / "examples" / "mlp.py"), "--nodes", "1", "--gpus", "2", "--dry-run", "--",
                    *MLP_ARGS, cwd=tmp_path, env=env)
    assert again.returncode == 0 and "stage(s)" in again.stdout and "profile.sh" not in again.stdout.split("==> commands")[1]


def test_hostile_inputs_end_to_end(tmp_path, mlp_profile):
    """Arguments, env values, job names and folder paths full of shell syntax reach the ranks verbatim."""
    pwned = tmp_path / "pwned"
    args = ["'; touch %s; echo '" % pwned, "$(touch %s)" % pwned, "`touch %s`" % pwned, "two words", "line\nbreak",
            '"quoted"', "\\", "$HOME", "*", ""]
    logs = tmp_path / "log dir with 'quote' and $(x)"
    env = _env(tmp_path, RANNC_LOGS_DIR=str(logs))
    res = run_cli("submit", str(SCRIPTS / "echo_args.py"), "--nodes", "1", "--gpus", "2", "--profile", str(mlp_profile),
                  "--name", "x'; touch %s #" % pwned, "--env", "HOSTILE=$(touch %s)'\"" % pwned, "--wait", "--", *args,
                  cwd=tmp_path, env=env, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    folder = job_folder(logs)
    for rank in (0, 1):
        got = json.loads((folder / "checkpoints" / f"argv-{rank}.json").read_text())
        assert got["argv"] == args and got["env"]["HOSTILE"] == "$(touch %s)'\"" % pwned
        assert got["env"]["RANK"] == str(rank) and got["env"]["WORLD_SIZE"] == "2"
    assert not pwned.exists()


def test_failing_rank_and_cancel_locally(tmp_path, mlp_profile):
    env = _env(tmp_path)
    t0 = time.monotonic()
    res = run_cli("submit", str(SCRIPTS / "raise_train.py"), "--nodes", "1", "--gpus", "2", "--profile",
                  str(mlp_profile), "--wait", cwd=tmp_path, env=env, timeout=120)
    assert res.returncode != 0 and time.monotonic() - t0 < 30
    assert "ended FAILED at train/rank-1.log" in res.stderr and "ValueError: boom from rank 1" in res.stderr
    assert len([line for line in res.stderr.splitlines() if line.strip()]) == 1
    folder = job_folder(tmp_path / "logs")
    assert "Traceback" in (folder / "train" / "rank-1.log").read_text()

    res = run_cli("submit", str(SCRIPTS / "ckpt_train.py"), "--nodes", "1", "--gpus", "2", "--profile",
                  str(mlp_profile), "--", "--steps", "500", cwd=tmp_path, env=env)
    assert res.returncode == 0
    folder = job_folder(tmp_path / "logs")
    wait_file_text(folder / "train" / "rank-1.log", "step 1 ", 60)
    rec = record(folder)
    res = run_cli("cancel", rec["id"], cwd=tmp_path, env=env)
    assert res.returncode == 0 and "cancelled train" in res.stdout
    pid = int(rec["phases"]["train"]["scheduler_id"])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        ps = subprocess.run(["ps", "-eo", "pid,pgid,args"], capture_output=True, text=True).stdout
        if not [line for line in ps.splitlines() if line.split()[1:2] == [str(pid)]]:
            break
        time.sleep(0.2)
    assert not [line for line in ps.splitlines() if line.split()[1:2] == [str(pid)]], "ranks outlived cancel"
    assert "CANCELLED" in run_cli("status", rec["id"], cwd=tmp_path, env=env).stdout


def test_a_crashed_rank_is_named_with_its_fault(tmp_path, mlp_profile):
    """A rank killed by a segmentation fault writes no exception: the fault handler's report names it."""
    env = _env(tmp_path)
    res = run_cli("submit", str(SCRIPTS / "raise_train.py"), "--nodes", "1", "--gpus", "2", "--profile",
                  str(mlp_profile), "--wait", "--", "--crash", cwd=tmp_path, env=env, timeout=120)
    assert res.returncode != 0
    assert "ended FAILED at train/rank-1.log" in res.stderr and "Fatal Python error: Segmentation fault" in res.stderr, \
        res.stderr
    assert "Traceback" not in res.stderr
    rank1 = (job_folder(tmp_path / "logs") / "train" / "rank-1.log").read_text()
    assert "raise_train.py" in rank1, rank1   # the fault handler's stack names the script's line


def test_a_local_job_cut_by_time_ends_timeout(tmp_path, mlp_profile):
    """--time: SIGUSR1 before the limit, the ranks checkpoint and exit 0; the job is TIMEOUT (resumable),
    not COMPLETED, in the record, in `rannc status` and in --wait's exit code."""
    env = _env(tmp_path, RANNC_REQUEUE_SIGNAL_SECONDS="10")
    res = run_cli("submit", str(SCRIPTS / "ckpt_train.py"), "--nodes", "1", "--gpus", "2", "--profile",
                  str(mlp_profile), "--time", "0:40", "--wait", "--", "--steps", "500", "--delay", "0.2",
                  cwd=tmp_path, env=env, timeout=180)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode != 0 and len(lines) == 1, res.stdout + res.stderr
    assert "ended TIMEOUT: time limit ahead: the ranks checkpointed at step" in lines[0], lines[0]
    assert "train: TIMEOUT" in res.stdout
    folder = job_folder(tmp_path / "logs")
    step = int((folder / "checkpoints" / "rannc-preempted").read_text())
    assert 0 < step < 500 and f"checkpointed at step {step}" in (folder / "train" / "rank-0.log").read_text()
    rec = record(folder)
    assert rec["phases"]["train"]["state"] == "TIMEOUT" and rec["phases"]["train"]["exit_code"] == 0
    status = run_cli("status", rec["id"], cwd=tmp_path, env=env)
    assert f"job {rec['id']} {rec['name']}: TIMEOUT" in status.stdout, status.stdout
    assert f"checkpointed at step {step}" in status.stdout


def _rank_pid(job_dir, rank: int) -> int | None:
    """The pid of the process that is rank ``rank`` of the local job in ``job_dir``."""
    from pathlib import Path

    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item)
        except OSError:
            continue
        if env.get("RANNC_JOB_DIR") == str(job_dir) and env.get("RANK") == str(rank) and "RANNC_HEARTBEAT_DIR" in env:
            return int(proc.name)
    return None


def test_status_names_a_stopped_rank_not_the_one_that_lost_contact(tmp_path, mlp_profile):
    """A rank SIGSTOPped mid-training (the real runtime, examples/mlp.py): the job fails within
    hang_timeout_seconds and the record and `rannc status` name that rank, not a survivor."""
    import signal

    env = _env(tmp_path, RANNC_HANG_TIMEOUT_SECONDS="5", RANNC_RUNTIME_TIMEOUT="600")
    res = run_cli("submit", str(ROOT / "examples" / "mlp.py"), "--nodes", "1", "--gpus", "2", "--profile",
                  str(mlp_profile), "--", *MLP_ARGS, "--steps", "1000000", cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    folder = job_folder(tmp_path / "logs")
    wait_file_text(folder / "train" / "rank-1.log", "step 3 ", 240)
    pid = _rank_pid(folder, 1)
    assert pid is not None
    os_kill = __import__("os").kill
    os_kill(pid, signal.SIGSTOP)
    rec = record(folder)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = run_cli("status", rec["id"], cwd=tmp_path, env=env)
        if "FAILED" in status.stdout.splitlines()[0]:
            break
        time.sleep(1)
    else:
        os_kill(pid, signal.SIGKILL)
        raise AssertionError(f"the job did not end after rank 1 stopped: {status.stdout}")
    assert "failed at train/rank-1.log: rank 1 stopped answering first (no heartbeat for " in status.stdout, status.stdout
    assert record(folder)["failure"].startswith("train/rank-1.log: rank 1 stopped answering first")
    assert "lost contact" not in record(folder)["failure"]


@pytest.mark.parametrize("flags,needle", [
    (["--nodes", "2", "--gpus", "1"], "the local backend runs on this machine only"),
    (["--gpus", "0"], "--gpus must be at least 1"),
    (["--gpus", "1", "--time", "soon"], "--time 'soon' is not a duration"),
    (["--gpus", "1", "--env", "1BAD=x"], "must be NAME=VALUE"),
    (["--gpus", "1", "--scheduler", "lsf"], "not one rannc can submit to"),
    (["--gpus", "1", "--site", str(Path(__file__).parent / "data" / "scheduler" / "lsf-site.yaml")],
     "site lsf-site uses lsf"),
    (["--gpus", "1", "--site", "nosuch"], "unknown site"),
    (["--gpus", "1", "--profile", "missing.yaml"], "--profile missing.yaml does not exist"),
])
def test_bad_input_is_one_line(tmp_path, flags, needle):
    res = run_cli("submit", str(SCRIPTS / "ckpt_train.py"), *flags, cwd=tmp_path, env=_env(tmp_path))
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode != 0 and len(lines) == 1 and needle in lines[0], res.stderr
    assert not (tmp_path / "logs").exists()


def test_bad_job_references(tmp_path):
    env = _env(tmp_path)
    for argv, needle in ((["status", "nosuch"], "no job 'nosuch'"), (["logs", "nosuch"], "no job"),
                         (["cancel", "nosuch"], "no job"), (["submit", "missing.py", "--gpus", "1"], "does not exist")):
        res = run_cli(*argv, cwd=tmp_path, env=env)
        assert res.returncode != 0 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert "no jobs yet" in run_cli("jobs", cwd=tmp_path, env=env).stdout


def test_help_does_not_import_torch():
    for argv in (["--help"], ["submit", "--help"], ["jobs", "--help"]):
        res = subprocess.run([sys.executable, "-X", "importtime", "-m", "rannc_cli.cli", *argv], capture_output=True,
                             text=True, cwd=ROOT)
        assert res.returncode == 0
        imported = {line.split("|")[-1].strip() for line in res.stderr.splitlines() if "|" in line}
        assert not {m for m in imported if m == "torch" or m.startswith("torch.")}, argv
