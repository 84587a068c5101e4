"""The unmodified example under torchrun (no rannc CLI) trains exactly like one plain process."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT

FAST = {"RANNC_PROFILE_WARMUP": "0", "RANNC_PROFILE_REPEATS": "1", "OMP_NUM_THREADS": "1"}
ARGS = ["--steps", "5", "--hidden", "64", "--layers", "4", "--batch-size", "16"]


def _losses(text: str) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for step, loss in re.findall(r"step (\d+) loss (\d+\.\d{4})", text):
        out.setdefault(int(step), set()).add(loss)
    return out


def test_torchrun_pipeline_matches_a_single_process(tmp_path):
    env = {**os.environ, **FAST, "RANNC_CACHE_DIR": str(tmp_path / "cache")}
    script = str(ROOT / "examples" / "mlp.py")
    single = subprocess.run([sys.executable, script, *ARGS], env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    dist = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           script, *ARGS], env={**env, "RANNC_STAGES": "2", "RANNC_MICROBATCHES": "2"},
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert dist.returncode == 0, dist.stdout[-2000:] + dist.stderr[-3000:]
    want, got = _losses(single.stdout), _losses(dist.stdout)
    assert sorted(want) == list(range(5)) and sorted(got) == list(range(5)), (want, got)
    for step in range(5):
        (expected,) = want[step]
        assert got[step] == {expected}, f"step {step}: torchrun ranks printed {got[step]}, one process {expected}"
