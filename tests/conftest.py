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


def installed_rannc() -> str:
    """The `rannc` console script of this interpreter's environment (what `pip install` made)."""
    import shutil

    beside = Path(sys.executable).with_name("rannc")
    found = str(beside) if beside.is_file() else shutil.which("rannc")
    if not found:
        pytest.fail(f"no `rannc` console script beside {sys.executable} or on PATH: install the project "
                    "(pip install -e .) into the environment that runs the tests", pytrace=False)
    return found


def run_installed(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300,
                  stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    """Run the installed `rannc` entry point itself (not `python -m`), as a user's shell would."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([installed_rannc(), *args], cwd=cwd or ROOT, env=full_env, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own profile cache and config file location."""
    base = tmp_path_factory.mktemp("rannc-home")
    (base / "config.yaml").write_text("")  # RANNC_CONFIG must name a file that exists
    monkeypatch.setenv("RANNC_CACHE_DIR", str(base / "cache"))
    monkeypatch.setenv("RANNC_CONFIG", str(base / "config.yaml"))
