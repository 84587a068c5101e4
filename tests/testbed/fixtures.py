"""Pytest fixtures for the testbed, started lazily once per session, only by tests that use them.

    def test_x(slurm_cluster): ...     # a running SlurmCluster (tests/testbed/slurm.py)
    def test_y(sshd_server): ...       # a running SSHServer on 127.0.0.1
    def test_z(slurm_login_node): ...  # an SSHServer whose sessions see slurm_cluster (SetEnv SLURM_CONF)

With CI=true a testbed that cannot start FAILS the test (nothing is skipped in CI); elsewhere
the test is skipped with the reason.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from testbed.common import TestbedUnavailable

_failures: dict[str, str] = {}


def _unavailable(what: str, why: str):
    _failures[what] = why
    message = f"{what} testbed cannot start: {why}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _start(what: str, starter):
    if what in _failures:
        _unavailable(what, _failures[what])
    try:
        return starter()
    except (TestbedUnavailable, OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _unavailable(what, " ".join(str(exc).split()))


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real Slurm (slurmctld + 3 slurmd with fake GPUs: n1, n2 gpu:a100:4 in 'gpu'; n3 gpu:v100:2 in 'small')."""
    from testbed.slurm import SlurmCluster

    cluster = _start("slurm", lambda: SlurmCluster.start(tmp_path_factory.mktemp("slurm")))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def sshd_server(tmp_path_factory):
    """A real sshd on 127.0.0.1 with its own host key and one authorized client key."""
    from testbed.sshd import SSHServer

    server = _start("sshd", lambda: SSHServer.start(tmp_path_factory.mktemp("sshd")))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def slurm_login_node(tmp_path_factory, slurm_cluster):
    """A real sshd on 127.0.0.1 acting as the Slurm testbed's login node (its sessions get SLURM_CONF)."""
    from testbed.sshd import SSHServer

    server = _start("sshd", lambda: SSHServer.start(tmp_path_factory.mktemp("login"),
                                                    set_env={"SLURM_CONF": str(slurm_cluster.conf)}))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pbs_wrappers(slurm_cluster):
    """Slurm's PBS-style commands (slurm-wlm-torque: qsub, qstat, qdel, pbsnodes, mpiexec -> srun) over
    slurm_cluster; returns the cluster (its ``env`` has SLURM_CONF). Real PBS syntax that the wrappers
    do not understand is covered by golden files and recorded outputs instead."""
    from testbed.common import ensure_commands

    _start("pbs-wrappers", lambda: ensure_commands({"qsub": "slurm-wlm-torque", "qstat": "slurm-wlm-torque",
                                                    "generate_pbs_nodefile": "slurm-wlm-torque"}))
    return slurm_cluster


@pytest.fixture(scope="session")
def gridengine(tmp_path_factory):
    """A real Grid Engine (sge_qmaster + sge_execd of Son of Grid Engine 8.1.9): queue all.q on this host,
    PEs smp and mpi, a fake per-job GPU consumable gpu=4 (tests/testbed/gridengine.py)."""
    from testbed.gridengine import GridEngine

    cluster = _start("gridengine", lambda: GridEngine.start(tmp_path_factory.mktemp("gridengine")))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def openpbs_server():
    """A real OpenPBS 23.06 (tests/testbed/openpbs.py) from the prebuilt tarball named by RANNC_TEST_OPENPBS;
    skipped with the reason where that is unset (failed under CI=true, which sets it)."""
    from pathlib import Path

    from testbed.openpbs import OpenPBSServer

    tarball = os.environ.get("RANNC_TEST_OPENPBS", "")
    if not tarball:
        _unavailable("openpbs", "RANNC_TEST_OPENPBS is not set (the path of a prebuilt openpbs-bookworm.tgz)")
    server = _start("openpbs", lambda: OpenPBSServer.start(Path(tarball)))
    yield server
    server.stop()
