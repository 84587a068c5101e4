"""`rannc topology --host` against a real sshd on 127.0.0.1 (tests/testbed/sshd.py)."""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml

from conftest import run_cli

pytestmark = pytest.mark.ssh


def _env(home) -> dict:
    env = {"HOME": str(home)}
    env["SSH_AUTH_SOCK"] = ""          # no agent: only the key files under HOME count
    return env


def _topology(home, tmp_path, *args):
    out = tmp_path / "topo.yaml"
    res = run_cli("topology", "--out", str(out), *args, env=_env(home), timeout=120)
    return res, (yaml.safe_load(out.read_text()) if out.exists() else None)


def test_remote_host_discovery(sshd_server, tmp_path):
    home = sshd_server.client_home(tmp_path / "home")
    res, topo = _topology(home, tmp_path, "--host", sshd_server.target, "--scheduler", "local")
    assert res.returncode == 0, res.stderr
    (node,) = topo["nodes"]
    assert topo["discovery"]["host"] == sshd_server.target
    assert node["name"] == subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip().split(".")[0]
    assert node["cpus"] == os.cpu_count()
    with open("/proc/meminfo") as handle:
        total_kb = int(handle.readline().split()[1])
    assert node["memory_bytes"] == total_kb * 1024
    assert topo["discovery"]["nvml"].startswith(("unavailable", "ok"))


def test_ssh_config_alias(sshd_server, tmp_path):
    home = sshd_server.client_home(tmp_path / "home")
    (home / ".ssh" / "config").write_text(
        f"Host testlogin\n  HostName 127.0.0.1\n  Port {sshd_server.port}\n  User {sshd_server.user}\n"
        f"  IdentityFile {home}/.ssh/id_ed25519\n")
    res, topo = _topology(home, tmp_path, "--host", "testlogin", "--scheduler", "local")
    assert res.returncode == 0, res.stderr
    assert topo["discovery"]["host"] == sshd_server.target


def test_unknown_host_key_is_refused(sshd_server, tmp_path):
    home = sshd_server.client_home(tmp_path / "home", known=False)
    res, topo = _topology(home, tmp_path, "--host", sshd_server.target, "--scheduler", "local")
    assert res.returncode == 2 and topo is None
    assert res.stderr.startswith(f"error: host key of [127.0.0.1]:{sshd_server.port} is unknown")
    assert "SHA256:" in res.stderr and "ssh-keyscan" in res.stderr and "Traceback" not in res.stderr
    assert (home / ".ssh" / "known_hosts").read_text() == ""        # nothing was accepted silently


def test_changed_host_key_is_refused(sshd_server, tmp_path):
    home = sshd_server.client_home(tmp_path / "home")
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kind, blob = open(f"{other}.pub").read().split()[:2]
    (home / ".ssh" / "known_hosts").write_text(f"[127.0.0.1]:{sshd_server.port} {kind} {blob}\n")
    res, _ = _topology(home, tmp_path, "--host", sshd_server.target, "--scheduler", "local")
    assert res.returncode == 2
    assert "CHANGED" in res.stderr and "ssh-keygen -R" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_failed_login_is_one_clear_line(sshd_server, tmp_path):
    home = sshd_server.client_home(tmp_path / "home", authorized=False)
    res, _ = _topology(home, tmp_path, "--host", sshd_server.target, "--scheduler", "local")
    assert res.returncode == 2
    assert res.stderr.startswith(f"error: login to {sshd_server.target} failed")
    assert "authorized_keys" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_closed_port_and_bad_target(sshd_server, tmp_path):
    from testbed.common import free_port

    home = sshd_server.client_home(tmp_path / "home")
    res, _ = _topology(home, tmp_path, "--host", f"{sshd_server.user}@127.0.0.1:{free_port()}")
    assert res.returncode == 2 and res.stderr.startswith("error: cannot connect to 127.0.0.1:")
    res, _ = _topology(home, tmp_path, "--host", "user@host:notaport")
    assert res.returncode == 2 and "is not a number" in res.stderr


@pytest.mark.slurm
def test_remote_slurm_discovery_through_login_node(slurm_login_node, slurm_cluster, tmp_path):
    home = slurm_login_node.client_home(tmp_path / "home")
    res, topo = _topology(home, tmp_path, "--host", slurm_login_node.target)     # scheduler auto-detected there
    assert res.returncode == 0, res.stderr
    assert topo["scheduler"] == "slurm" and topo["discovery"]["host"] == slurm_login_node.target
    assert {n["name"]: n["gpus"] for n in topo["nodes"]} == {k: s.gpus for k, s in slurm_cluster.nodes.items()}
    res, _ = _topology(home, tmp_path, "--host", slurm_login_node.target, "--measure")
    assert res.returncode == 2 and "not over --host" in res.stderr
