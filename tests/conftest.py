"""Shared fixtures: paths, example scripts, the CLI runner."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.fixtures import gridengine, openpbs_server, pbs_wrappers, slurm_cluster, slurm_login_node, sshd_server  # noqa: F401  (testbed fixtures, started lazily)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def load_example(name: str):
    """Import examples/<name>.py as a module (without running its main)."""
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"rannc_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the installed `rannc` command as a user would, capturing its output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "rannc_cli.cli", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own profile cache and config file location."""
    base = tmp_path_factory.mktemp("rannc-home")
    monkeypatch.setenv("RANNC_CACHE_DIR", str(base / "cache"))
    monkeypatch.setenv("RANNC_CONFIG", str(base / "config.yaml"))
