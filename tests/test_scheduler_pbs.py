"""PBS backend: parsers of qsub/qstat outputs (recorded on the real OpenPBS testbed), state mapping, and
qsub/qstat/qdel flows through Slurm's PBS-style wrappers (slurm-wlm-torque) on the real Slurm testbed.
End to end on the real OpenPBS server: tests/test_submit_openpbs.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import run_cli
from rannc_cli.errors import RanncError
from rannc_cli.scheduler.backends.pbs import job_state, parse_qstat_full, parse_qstat_json, parse_qsub
from rannc_cli.scheduler.backends.slurm import parse_sbatch, parse_squeue
from testbed.scheduler import FAST, SCRIPTS, job_folder, make_profile, record

DATA = Path(__file__).parent / "data" / "scheduler" / "pbs"


def read(name: str) -> str:
    return (DATA / name).read_text()


def test_qsub_ids():
    assert parse_qsub(read("openpbs-23.06-qsub.txt")) == "19.rannc-pbs"
    assert parse_qsub(read("slurm-wlm-torque-22.05-qsub.txt")).isdigit()
    assert parse_qsub("4321[].pbs01\n") == "4321[].pbs01"
    with pytest.raises(RanncError, match="qsub printed no job id"):
        parse_qsub(read("openpbs-23.06-qsub-rejected.txt"))


def test_running_job_text_and_json_agree():
    jobs = parse_qstat_full(read("openpbs-23.06-qstat-f-running.txt"))
    attrs = jobs["19.rannc-pbs"]
    assert attrs["Variable_List"].endswith("PBS_O_HOST=rannc-pbs-client")   # wrapped value joined back
    assert attrs["Resource_List.select"] == "1:ncpus=2:ngpus=2:mpiprocs=2"
    assert job_state(attrs).state == "RUNNING"
    js = parse_qstat_json(read("openpbs-23.06-qstat-f-json-running.json"))["19.rannc-pbs"]
    assert js["Resource_List"]["select"] == attrs["Resource_List.select"] and job_state(js).state == "RUNNING"
    assert js["Variable_List"]["PBS_O_HOST"] == "rannc-pbs-client"


def test_history_exit_statuses():
    jobs = parse_qstat_full(read("openpbs-23.06-qstat-xf-finished.txt"))
    assert job_state(jobs["20.rannc-pbs"]).state == "COMPLETED"
    failed = job_state(jobs["21.rannc-pbs"])
    assert (failed.state, failed.exit_code) == ("FAILED", 1)
    deleted = job_state(jobs["24.rannc-pbs"])             # qdel of a running job: SIGTERM, 256 + 15
    assert (deleted.state, deleted.exit_code) == ("CANCELLED", 271)


def test_walltime_and_can_never_run():
    t = job_state(parse_qstat_json(read("openpbs-23.06-qstat-xf-json-walltime.json"))["22.rannc-pbs"])
    assert (t.state, t.exit_code) == ("TIMEOUT", -29) and "exceeded resource walltime" in t.reason
    q = job_state(parse_qstat_json(read("openpbs-23.06-qstat-f-json-never.json"))["27.rannc-pbs"])
    assert q.state == "PENDING" and q.never
    assert q.reason == "Can Never Run: Insufficient amount of resource: ngpus (R: 99 A: 4 T: 4)"
    assert not job_state({"job_state": "Q", "comment": "Not Running: Insufficient amount of resource: ngpus"}).never


def test_torque_and_wrapper_layouts():
    torque = job_state(parse_qstat_full(read("torque-6.1-qstat-f-completed.txt"))["512.torque-head.cluster"])
    assert (torque.state, torque.exit_code) == ("FAILED", 137)
    running = parse_qstat_full(read("slurm-wlm-torque-22.05-qstat-f-running.txt"))
    (jid, attrs), = running.items()
    assert jid.isdigit() and job_state(attrs).state == "RUNNING"
    done = parse_qstat_full(read("slurm-wlm-torque-22.05-qstat-f-finished.txt"))
    assert job_state(next(iter(done.values()))).state == "UNKNOWN"   # C without an exit status: the exit file decides


def test_slurm_outputs():
    assert parse_sbatch("42\n") == "42" and parse_sbatch("42;cluster\n") == "42"
    assert parse_squeue("PENDING|Dependency\n") == ("PENDING", "Dependency")
    assert parse_squeue("") is None


# ---------------------------------------------------------------------- flows through the wrappers
@pytest.fixture(scope="module")
def mlp_profile(tmp_path_factory):
    return make_profile(tmp_path_factory.mktemp("pbs-prof"))


def _env(cluster, tmp_path) -> dict:
    return {**cluster.env, **FAST, "RANNC_LOGS_DIR": str(tmp_path / "logs")}


@pytest.mark.slurm
def test_pbs_submit_through_wrappers_two_nodes(pbs_wrappers, tmp_path, mlp_profile):
    """qsub (select=2:...:mpiprocs=2 as options), the site's MPI launcher (`submit: mpi: mpiexec`: the wrappers'
    mpiexec, which starts the ranks through srun) on 2 nodes, qstat until done, per-rank logs."""
    env = _env(pbs_wrappers, tmp_path)
    site = tmp_path / "pbs-with-mpi.yaml"
    site.write_text("name: pbs-with-mpi\nscheduler: pbs\nnode_groups: [{name: g, count: 2, gpus: 4}]\n"
                    "submit:\n  mpi: mpiexec\n")
    res = run_cli("submit", str(SCRIPTS / "ckpt_train.py"), "--site", str(site), "--queue", "gpu", "--nodes", "2",
                  "--gpus", "2", "--time", "10:00", "--account", "grp1", "--profile", str(mlp_profile),
                  "--env", "RANNC_MASTER_ADDR=127.0.0.1", "--wait", "--", "--steps", "4", "--delay", "0.05",
                  cwd=tmp_path, env=env, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    folder = job_folder(tmp_path / "logs")
    rec = record(folder)
    assert rec["backend"] == "pbs" and rec["phases"]["train"]["state"] == "COMPLETED"
    for r in range(4):
        text = (folder / "train" / f"rank-{r}.log").read_text()
        assert f"rank {r} of 4" in text and "done" in text
    train = (folder / "train.sh").read_text()
    assert "#PBS -l select=2:ncpus=2:ngpus=2:mpiprocs=2" in train and "\nmpiexec -n 4 bash" in train


@pytest.mark.slurm
def test_pbs_dependency_and_qdel(pbs_wrappers, tmp_path):
    """Profiling job (afterok dependency) running, training job waiting on it; rannc cancel qdel's both."""
    env = _env(pbs_wrappers, tmp_path)
    slow = tmp_path / "slow.py"
    slow.write_text("import time\ntime.sleep(60)\n")
    res = run_cli("submit", str(slow), "--scheduler", "pbs", "--nodes", "1", "--gpus", "1", "--time", "5:00",
                  cwd=tmp_path, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    folder = job_folder(tmp_path / "logs")
    rec = record(folder)
    pid, tid = rec["phases"]["profile"]["scheduler_id"], rec["phases"]["train"]["scheduler_id"]
    show = pbs_wrappers.run("scontrol", "show", "job", tid).stdout
    assert f"Dependency=afterok:{pid}" in show
    res = run_cli("cancel", rec["id"], cwd=tmp_path, env=env)
    assert res.returncode == 0 and "cancelled train" in res.stdout and "profile" in res.stdout, res.stdout + res.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = {pbs_wrappers.run("squeue", "-h", "-j", j, "-t", "all", "-o", "%T").stdout.strip() for j in (pid, tid)}
        if states <= {"CANCELLED", ""}:
            break
        time.sleep(0.3)
    assert states <= {"CANCELLED", ""}, states
    status = run_cli("status", rec["id"], cwd=tmp_path, env=env)
    assert "CANCELLED" in status.stdout


@pytest.mark.slurm
def test_qsub_rejection_is_one_line(pbs_wrappers, tmp_path, mlp_profile):
    env = {**_env(pbs_wrappers, tmp_path)}
    res = run_cli("submit", str(SCRIPTS / "ckpt_train.py"), "--scheduler", "pbs", "--queue", "nosuch", "--nodes", "1",
                  "--gpus", "1", "--profile", str(mlp_profile), cwd=tmp_path, env=env, timeout=60)
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: qsub failed on local:") and "Traceback" not in res.stderr
    assert "partition" in lines[0].lower()   # the scheduler's own message
