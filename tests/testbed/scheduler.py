"""Helpers for the scheduler tests: a small profile made once, waiting on job records.

    prof = make_profile(tmp_dir)                 # examples/mlp.py, tiny, measured with 1 repeat
    rec = wait_state(folder, "train", {"RUNNING"}, timeout=60)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "tests" / "data" / "scheduler" / "scripts"
MLP_ARGS = ["--steps", "12", "--hidden", "32", "--layers", "2", "--lr", "0.02", "--batch-size", "128"]
# The stand-in scripts (tests/data/scheduler/scripts) reuse examples/mlp.py's profile on purpose.
FAST = {"RANNC_PROFILE_REPEATS": "1", "RANNC_PROFILE_WARMUP": "0", "RANNC_POLL_SECONDS": "0.3",
        "RANNC_PROFILE_SCRIPT_CHECK": "0"}


def make_profile(tmp: Path) -> Path:
    out = Path(tmp) / "mlp-profile.yaml"
    env = {**os.environ, **FAST, "RANNC_CACHE_DIR": str(Path(tmp) / "cache")}
    subprocess.run([sys.executable, "-m", "rannc_cli.cli", "profile", str(ROOT / "examples" / "mlp.py"), "--out",
                    str(out), "--", *MLP_ARGS], cwd=tmp, env=env, check=True, capture_output=True, timeout=300)
    return out


def job_folder(logs: Path) -> Path:
    folders = sorted(p for p in Path(logs).iterdir() if (p / "job.yaml").is_file())
    assert folders, f"no job folder under {logs}"
    return folders[-1]


def job_logs(logs: Path, tail: int = 1500) -> str:
    """The newest job folder's scripts' and ranks' logs (tails), for failure messages."""
    try:
        folder = job_folder(logs)
    except (AssertionError, FileNotFoundError):
        return f"\n(no job folder under {logs})"
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err"))
    return "".join(f"\n--- {p.relative_to(folder)}\n" + p.read_text(errors="replace")[-tail:] for p in files)


def record(folder: Path) -> dict:
    import yaml

    return yaml.safe_load((Path(folder) / "job.yaml").read_text())


def wait_file_text(path: Path, needle: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and needle in path.read_text(errors="replace"):
            return path.read_text(errors="replace")
        time.sleep(0.2)
    raise AssertionError(f"{needle!r} did not appear in {path} within {timeout} s")
