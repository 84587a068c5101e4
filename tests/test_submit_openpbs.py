"""`rannc submit --scheduler pbs` end to end on a real OpenPBS 23.06 server (tests/testbed/openpbs.py).

No site MPI here: the ranks start through PBS's own task launch (pbs_tmrsh), as on any PBS site
whose config names no `submit: mpi:`; two execution hosts (pbs_mom in two network namespaces). The MPI path is covered by golden files and by Slurm's PBS
wrappers (tests/test_scheduler_pbs.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_cli
from testbed.scheduler import FAST, MLP_ARGS, SCRIPTS, job_folder, job_logs, make_profile, record, wait_file_text

pytestmark = pytest.mark.openpbs


@pytest.fixture(scope="module")
def mlp_profile(tmp_path_factory):
    return make_profile(tmp_path_factory.mktemp("openpbs-prof"))


def _env(server, tmp_path, **extra) -> dict:
    return {**server.env, **FAST, "RANNC_LOGS_DIR": str(tmp_path / "logs"), **extra}


def _step_lines(text: str) -> list[tuple[int, float]]:
    return [(int(a), float(b)) for a, b in re.findall(r"^step (\d+) loss ([0-9.]+)$", text, flags=re.M)]


def _history(server, job_id: str) -> dict:
    """The job's attributes from PBS's own history (qstat -x -f -F json)."""
    res = server.run("qstat", "-x", "-f", "-F", "json", job_id)
    assert res.returncode == 0, res.stderr
    return next(iter(json.loads(res.stdout)["Jobs"].values()))


def _wait_status(tmp_path, env, job: str, word: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        out = run_cli("status", job, cwd=tmp_path, env=env).stdout
        if word in out.split("\n")[0]:
            return out
        time.sleep(0.5)
    raise AssertionError(f"job {job} not {word} after {timeout} s: {out}")


@pytest.mark.parametrize("nodes", [1, 2])
def test_mlp_ranks_complete_with_the_losses_of_one_process(openpbs_server, tmp_path, nodes):
    """Profile job -> plan at the training job's start -> 2 ranks per node via pbs_tmrsh (on 2 nodes: to the
    second pbs_mom in its own network namespace, gloo across the bridge) -> COMPLETED; every rank's losses
    equal plain single-process PyTorch's, number by number."""
    env = _env(openpbs_server, tmp_path)
    t0 = time.monotonic()
    res = run_cli("submit", str(ROOT / "examples" / "mlp.py"), "--scheduler", "pbs", "--nodes", str(nodes),
                  "--gpus", "2", "--time", "10:00", "--wait", "--", *MLP_ARGS, cwd=tmp_path, env=env, timeout=400)
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stdout + res.stderr + job_logs(tmp_path / "logs") + openpbs_server.logs()
    print(f"submit-to-COMPLETED on the OpenPBS testbed, {nodes} node(s) x 2: {took:.1f} s")
    folder = job_folder(tmp_path / "logs")
    rec = record(folder)
    assert [rec["phases"][p]["state"] for p in ("profile", "plan", "train")] == ["COMPLETED"] * 3
    train = (folder / "train.sh").read_text()
    assert f"#PBS -l select={nodes}:ncpus=2:ngpus=2:mpiprocs=2" in train and "pbs_tmrsh" in train
    assert "mpiexec" not in train and "mpirun" not in train
    tid = str(rec["phases"]["train"]["scheduler_id"])
    hist = _history(openpbs_server, tid)
    assert hist["job_state"] == "F" and hist["Exit_status"] == 0
    assert f"depend=afterok:{rec['phases']['profile']['scheduler_id']}" in hist["Submit_arguments"]
    assert hist["Resource_List"]["ngpus"] == 2 * nodes
    hosts = sorted((folder / "train" / f"rank-{r}.pid").read_text().split()[0] for r in range(2 * nodes))
    assert len(set(hosts)) == nodes and hosts.count(hosts[0]) == 2, hosts     # 2 ranks on each node
    assert sorted(c.split(":")[0].strip("(") for c in hist["exec_vnode"].split("+")) == sorted(set(hosts))

    ref = subprocess.run([sys.executable, str(ROOT / "examples" / "mlp.py"), *MLP_ARGS], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    reference = _step_lines(ref.stdout)
    assert [s for s, _ in reference] == list(range(12))
    for rank in range(2 * nodes):
        got = _step_lines((folder / "train" / f"rank-{rank}.log").read_text())
        assert [s for s, _ in got] == list(range(12)), f"rank {rank}: {got}"
        for (step, a), (_, b) in zip(got, reference):
            assert abs(a - b) <= 2e-4, f"rank {rank} step {step}: loss {a} != one process's {b}"
    status = run_cli("status", rec["id"], cwd=tmp_path, env=env)
    assert status.returncode == 0 and "COMPLETED" in status.stdout


def test_cancel_running_job(openpbs_server, tmp_path, mlp_profile):
    env = _env(openpbs_server, tmp_path)
    res = run_cli("submit", str(SCRIPTS / "ckpt_train.py"), "--scheduler", "pbs", "--nodes", "1", "--gpus", "2",
                  "--profile", str(mlp_profile), "--", "--steps", "400", "--delay", "0.2", cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    folder = job_folder(tmp_path / "logs")
    wait_file_text(folder / "train" / "rank-1.log", "step 2 ", 90)
    rec = record(folder)
    tid = str(rec["phases"]["train"]["scheduler_id"])
    res = run_cli("cancel", rec["id"], cwd=tmp_path, env=env)
    assert res.returncode == 0 and f"cancelled train {tid}" in res.stdout, res.stdout + res.stderr
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _history(openpbs_server, tid)["job_state"] != "F":
        time.sleep(0.3)
    hist = _history(openpbs_server, tid)
    assert hist["job_state"] == "F" and hist["Exit_status"] in (271, 265), hist   # qdel: SIGTERM (+256), SIGKILL
    status = _wait_status(tmp_path, env, rec["id"], "CANCELLED", 30)
    assert "CANCELLED" in status
    assert "step 399" not in (folder / "train" / "rank-0.log").read_text()
    again = run_cli("cancel", rec["id"], cwd=tmp_path, env=env)
    assert again.returncode == 0 and "nothing to cancel" in again.stdout


def test_failing_rank_fails_the_job_and_is_named(openpbs_server, tmp_path, mlp_profile):
    env = _env(openpbs_server, tmp_path)
    res = run_cli("submit", str(SCRIPTS / "raise_train.py"), "--scheduler", "pbs", "--nodes", "1", "--gpus", "2",
                  "--profile", str(mlp_profile), "--wait", cwd=tmp_path, env=env, timeout=180)
    assert res.returncode != 0
    assert "ended FAILED at train/rank-1.log" in res.stderr and "ValueError: boom from rank 1" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    folder = job_folder(tmp_path / "logs")
    rank0 = (folder / "train" / "rank-0.log").read_text()
    assert "step 99" not in rank0            # rank 0 was stopped (it would run 20 s alone)
    tid = str(record(folder)["phases"]["train"]["scheduler_id"])
    assert _history(openpbs_server, tid)["Exit_status"] == 1    # the failed rank's exit status, through pbs_tmrsh
    status = run_cli("status", folder.name, cwd=tmp_path, env=env)
    assert "FAILED" in status.stdout and "failed at train/rank-1.log" in status.stdout


def test_walltime_warning_checkpoints_and_the_rerun_resumes(openpbs_server, tmp_path, mlp_profile):
    """--time 0:40: the job script's own warning (20 s ahead of the walltime, which PBS never announces)
    makes every rank checkpoint and exit 0; the job reruns itself (qrerun, -r y) under the same id and the
    ranks resume from their checkpoint, so every step runs exactly once."""
    env = _env(openpbs_server, tmp_path)
    res = run_cli("submit", str(SCRIPTS / "ckpt_train.py"), "--scheduler", "pbs", "--nodes", "1", "--gpus", "2",
                  "--time", "0:40", "--profile", str(mlp_profile), "--", "--steps", "250", "--delay", "0.1",
                  cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    folder = job_folder(tmp_path / "logs")
    rec = record(folder)
    status = _wait_status(tmp_path, env, rec["id"], "COMPLETED", 200)
    assert "requeued 1x" in status, status
    tid = str(rec["phases"]["train"]["scheduler_id"])
    hist = _history(openpbs_server, tid)
    assert hist["run_count"] == 2 and hist["Exit_status"] == 0, hist
    batch = (folder / "train" / "batch.log").read_text()
    assert "SIGUSR1: asking every rank to checkpoint" in batch and f"rerunning job {tid}" in batch
    for rank in (0, 1):
        text = (folder / "train" / f"rank-{rank}.log").read_text()
        stopped = int(re.search(r"checkpointed at step (\d+)", text).group(1))
        assert 0 < stopped < 250 and f"rank {rank} of 2: resumed at step {stopped} restart 1" in text, text[-500:]
        steps = [int(s) for s in re.findall(r"^step (\d+) ", text, flags=re.M)]
        assert steps == list(range(250)), f"rank {rank}: steps run twice or lost"


def test_mlp_rerun_after_checkpoint_equals_an_uninterrupted_run(openpbs_server, tmp_path, mlp_profile):
    """The real runtime: SIGUSR1 to the job script (what its own walltime warning sends) -> every rank
    checkpoints at a step boundary and exits 0 -> qrerun -> the rerun keeps the plan and its losses equal
    an uninterrupted run's, number by number."""
    steps = 80
    args = [*MLP_ARGS[2:], "--steps", str(steps)]
    env = _env(openpbs_server, tmp_path, OMP_NUM_THREADS="1")
    res = run_cli("submit", str(ROOT / "examples" / "mlp.py"), "--scheduler", "pbs", "--nodes", "1", "--gpus", "2",
                  "--profile", str(mlp_profile), "--", *args, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    folder = job_folder(tmp_path / "logs")
    rec = record(folder)
    tid = str(rec["phases"]["train"]["scheduler_id"])
    wait_file_text(folder / "train" / "rank-1.log", "step 5 ", 120)
    plan_before = (folder / "plan.yaml").read_text()
    # the job script as pbs_mom runs it (PBS_HOME/mom_priv/jobs/<id>.SC; the daemons share this PID namespace)
    shell = subprocess.run(["pgrep", "-o", "-f", f"mom_priv/jobs/{tid}.SC"], capture_output=True, text=True).stdout.split()
    assert len(shell) == 1, shell
    subprocess.run(["kill", "-USR1", shell[0]], check=True)
    wait_file_text(folder / "train" / "rank-0.log", "checkpointed at step", 60)
    status = _wait_status(tmp_path, env, rec["id"], "COMPLETED", 300)
    assert "requeued 1x" in status
    assert (folder / "plan.yaml").read_text() == plan_before
    assert _history(openpbs_server, tid)["run_count"] == 2

    ref = subprocess.run([sys.executable, "-m", "rannc_cli.cli", "run", "--nproc", "2", "--plan",
                          str(folder / "plan.yaml"), str(ROOT / "examples" / "mlp.py"), "--", *args],
                         cwd=tmp_path, env={**env, "RANNC_CHECKPOINT_DIR": ""}, capture_output=True, text=True,
                         timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    reference = _step_lines(ref.stdout)
    assert [s for s, _ in reference] == list(range(steps))
    for rank in (0, 1):
        text = (folder / "train" / f"rank-{rank}.log").read_text()
        first, _, second = text.partition("exiting for requeue")
        stopped = int(re.search(r"checkpointed at step (\d+)", first).group(1))
        assert 5 < stopped < steps, stopped
        assert _step_lines(first) == reference[:stopped - 1], f"rank {rank}: first run differs from the reference"
        assert _step_lines(second) == reference, f"rank {rank}: the rerun's losses differ from the uninterrupted run's"
    assert "same plan, exact shards" in (folder / "train" / "rank-0.log").read_text()


def test_a_request_no_node_can_hold_ends_the_wait_with_pbs_comment(openpbs_server, tmp_path, mlp_profile):
    """ngpus=99 past rannc's own pre-check (a site directive): PBS queues it with "Can Never Run: ..."; --wait
    ends non-zero with that comment instead of waiting forever."""
    site = tmp_path / "greedy.yaml"
    site.write_text("name: greedy\nscheduler: pbs\nnode_groups: [{name: g, count: 1, gpus: 4}]\n"
                    "submit:\n  directives: ['-l select=1:ncpus=1:ngpus=99']\n")
    env = _env(openpbs_server, tmp_path)
    t0 = time.monotonic()
    res = run_cli("submit", str(SCRIPTS / "ckpt_train.py"), "--site", str(site), "--nodes", "1", "--gpus", "1",
                  "--profile", str(mlp_profile), "--wait", cwd=tmp_path, env=env, timeout=120)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "can never start" in res.stderr and "Can Never Run: Insufficient amount of resource: ngpus" in res.stderr, \
        res.stdout + res.stderr
    print(f"never-runnable request recognised after {time.monotonic() - t0:.1f} s")
    folder = job_folder(tmp_path / "logs")
    status = run_cli("status", record(folder)["id"], cwd=tmp_path, env=env)
    assert "can never start" in status.stdout
    run_cli("cancel", record(folder)["id"], cwd=tmp_path, env=env)


def test_precheck_reads_the_real_nodes(openpbs_server, tmp_path):
    """pbsnodes of the real server: 8 GPUs per node asked, 4 there -> refused before anything is submitted."""
    env = _env(openpbs_server, tmp_path)
    before = openpbs_server.run("qselect", "-x").stdout
    res = run_cli("submit", str(SCRIPTS / "ckpt_train.py"), "--scheduler", "pbs", "--nodes", "1", "--gpus", "8",
                  cwd=tmp_path, env=env)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "0 available node(s) with >= 8 GPUs, 1 asked (GPUs per node there: 4)" in res.stderr, res.stderr
    res = run_cli("submit", str(SCRIPTS / "ckpt_train.py"), "--scheduler", "pbs", "--nodes", "3", "--gpus", "2",
                  cwd=tmp_path, env=env)
    assert res.returncode != 0 and "2 available node(s) with >= 2 GPUs, 3 asked" in res.stderr, res.stderr
    assert openpbs_server.run("qselect", "-x").stdout == before
