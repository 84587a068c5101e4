"""Run a command here or on another host, one interface for both.

    runner = LocalRunner()                       # or ssh.SSHRunner("user@login.example")
    res = runner.run(["scontrol", "show", "node", "-o"])
    res.rc, res.stdout, res.stderr
    runner.which("sinfo")                        # True when the command exists there

Discovery code only talks to a Runner, so it reads a remote cluster exactly as a local one.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str


class Runner(Protocol):
    host: str   # "local", or "user@host[:port]"

    def run(self, argv: Sequence[str] | str, timeout: float = 60) -> Result: ...

    def which(self, name: str) -> bool: ...

    def env(self, name: str) -> str | None: ...


class LocalRunner:
    """Runs on this machine; ``env`` reads this process's environment (a job's SLURM_* variables)."""

    host = "local"

    def run(self, argv: Sequence[str] | str, timeout: float = 60) -> Result:
        shell = isinstance(argv, str)
        try:
            proc = subprocess.run(argv, shell=shell, capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError as exc:
            return Result(127, "", str(exc))
        except subprocess.TimeoutExpired:
            cmd = argv if shell else shlex.join(argv)
            return Result(124, "", f"{cmd} timed out after {timeout:.0f} s")
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def which(self, name: str) -> bool:
        return shutil.which(name) is not None

    def env(self, name: str) -> str | None:
        return os.environ.get(name)
