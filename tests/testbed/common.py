"""Shared helpers of the testbed: install packages with apt, pick free ports, wait for readiness.

    ensure_commands({"slurmctld": "slurm-wlm", "munged": "munge"})
    port = free_port()
    wait_for(lambda: probe() , timeout=20, what="slurmctld")
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from typing import Callable


class TestbedUnavailable(RuntimeError):
    """The testbed cannot start here (no root, no apt, a daemon that will not come up)."""


def ensure_commands(commands: dict[str, str]) -> None:
    """Install the Debian packages providing missing commands (name -> package), with apt-get."""
    missing = sorted({pkg for cmd, pkg in commands.items() if not _which(cmd)})
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise TestbedUnavailable(f"missing packages {', '.join(missing)} and no root apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            raise TestbedUnavailable(f"{' '.join(argv)} failed: {proc.stderr.strip()[-300:]}")
    still = [cmd for cmd in commands if not _which(cmd)]
    if still:
        raise TestbedUnavailable(f"installed {', '.join(missing)} but {', '.join(still)} still missing")


def _which(cmd: str) -> bool:
    return shutil.which(cmd) is not None or shutil.which(cmd, path="/usr/sbin:/sbin") is not None


def sbin(cmd: str) -> str:
    """Full path of a daemon (often in /usr/sbin, not always on PATH)."""
    found = shutil.which(cmd) or shutil.which(cmd, path="/usr/sbin:/sbin")
    if not found:
        raise TestbedUnavailable(f"{cmd} not found")
    return found


def free_port(count: int = 1) -> int:
    """First of ``count`` consecutive free TCP ports on 127.0.0.1."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count >= 65535:
            continue
        if all(_port_free(base + k) for k in range(count)):
            return base
    raise TestbedUnavailable("no free consecutive ports on 127.0.0.1")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_for(probe: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return
        time.sleep(interval)
    raise TestbedUnavailable(f"{what} not ready after {timeout:.0f} s")


