"""Remote mode: `rannc submit --host` drives the Slurm testbed through a real sshd on loopback
(job folder over SFTP, sbatch/squeue over SSH, host key verified)."""

from __future__ import annotations

import sys

import pytest

from conftest import run_cli
from testbed.scheduler import FAST, SCRIPTS, job_folder, make_profile, record

pytestmark = [pytest.mark.slurm, pytest.mark.ssh]


@pytest.fixture(scope="module")
def mlp_profile(tmp_path_factory):
    return make_profile(tmp_path_factory.mktemp("remote-prof"))


def test_submit_over_ssh(slurm_login_node, tmp_path, mlp_profile):
    home = slurm_login_node.client_home(tmp_path / "home")
    remote = tmp_path / "remote jobs"
    env = {**FAST, "HOME": str(home), "RANNC_LOGS_DIR": str(tmp_path / "logs"), "RANNC_REMOTE_DIR": str(remote),
           "RANNC_REMOTE_PYTHON": sys.executable, "SLURM_CONF": "/nonexistent"}   # only the login node knows Slurm
    res = run_cli("submit", str(SCRIPTS / "ckpt_train.py"), "--scheduler", "slurm", "--host", slurm_login_node.target,
                  "--nodes", "1", "--gpus", "2", "--profile", str(mlp_profile), "--wait", "--", "--steps", "3",
                  "--delay", "0.05", cwd=tmp_path, env=env, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    folder = job_folder(tmp_path / "logs")
    rec = record(folder)
    assert rec["host"] == slurm_login_node.target and rec["remote_dir"].startswith(str(remote))
    rdir = remote / folder.name
    assert rdir.stat().st_mode & 0o777 == 0o700
    assert (rdir / "src" / "ckpt_train.py").read_text() == (SCRIPTS / "ckpt_train.py").read_text()
    assert "done" in (rdir / "train" / "rank-1.log").read_text()
    assert (folder / "train.sh").read_text() == (rdir / "train.sh").read_text()
    logs = run_cli("logs", rec["id"], "--rank", "1", cwd=tmp_path, env=env)      # read over SFTP
    assert logs.returncode == 0 and "rank 1 of 2" in logs.stdout and "done" in logs.stdout
    status = run_cli("status", rec["id"], cwd=tmp_path, env=env)
    assert "COMPLETED" in status.stdout and f"remote {slurm_login_node.target}" in status.stdout


def test_unknown_host_key_is_refused(slurm_login_node, tmp_path, mlp_profile):
    home = slurm_login_node.client_home(tmp_path / "home", known=False)
    env = {"HOME": str(home), "RANNC_LOGS_DIR": str(tmp_path / "logs"), "RANNC_PROFILE_SCRIPT_CHECK": "0"}
    res = run_cli("submit", str(SCRIPTS / "ckpt_train.py"), "--scheduler", "slurm", "--host", slurm_login_node.target,
                  "--nodes", "1", "--gpus", "1", "--profile", str(mlp_profile), cwd=tmp_path, env=env, timeout=60)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode != 0 and len(lines) == 1 and "host key" in lines[0] and "unknown" in lines[0], res.stderr
    assert not (tmp_path / "logs").exists()
