"""Preemption under `rannc run`: SIGUSR1 -> checkpoint at a step boundary -> exit 0 -> resume, exactly.

The unmodified examples/mlp.py runs under `rannc run --nproc 2` with RANNC_CHECKPOINT_DIR set; the test
signals the launcher (which forwards SIGUSR1 to every rank) once training is under way. Every rank must
finish its step, write the checkpoint and exit 0. A second launch with the same plan resumes: its printed
losses for all steps (replayed ones first, then trained ones) must equal an uninterrupted run's, number by
number. A third launch on 3 processes with another plan loads the gathered state and must continue the
same trajectory (float tolerance: microbatch slicing changes summation order).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MLP = ROOT / "examples" / "mlp.py"
STEPS = 600
ARGS = ["--steps", str(STEPS), "--hidden", "32", "--layers", "2", "--batch-size", "64", "--lr", "0.01"]


def _run(tmp: Path, nproc: int, replicas: str, ckpt: Path | None, *, signal_after: str | None = None,
         timeout: float = 300) -> tuple[int, str, str]:
    env = {**os.environ, "RANNC_RUNTIME_TIMEOUT": "60", "RANNC_CHECKPOINT_DIR": str(ckpt) if ckpt else ""}
    argv = [sys.executable, "-m", "rannc_cli.cli", "run", "--nproc", str(nproc), "--replicas", replicas,
            "--microbatches", "2", "--log-dir", str(tmp / f"logs-{nproc}"), str(MLP), "--", *ARGS]
    out_path, err_path = tmp / "out.txt", tmp / "err.txt"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(argv, cwd=tmp, env=env, stdout=out, stderr=err)
        if signal_after is not None:
            deadline = time.monotonic() + timeout
            while signal_after not in out_path.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert proc.poll() is None, "training ended before the signal could be sent: raise STEPS"
            proc.send_signal(signal.SIGUSR1)
        code = proc.wait(timeout=timeout)
    return code, out_path.read_text(), err_path.read_text()


def _losses(text: str) -> list[tuple[int, float]]:
    return [(int(a), float(b)) for a, b in re.findall(r"^step (\d+) loss ([0-9.]+)$", text, flags=re.M)]


def test_sigusr1_checkpoints_and_resume_continues_the_trajectory(tmp_path):
    code, out, err = _run(tmp_path, 2, "1,1", None)
    assert code == 0, err[-2000:]
    reference = _losses(out)
    assert [s for s, _ in reference] == list(range(STEPS))

    ckpt = tmp_path / "ckpt"
    code, out1, err1 = _run(tmp_path, 2, "1,1", ckpt, signal_after="step 20 ")
    assert code == 0, f"a preempted run must exit 0: {err1[-2000:]}"
    stopped = {int(k) for k in re.findall(r"rank \d checkpointed at step (\d+)", err1 + (tmp_path / "logs-2" / "rank-1.log").read_text())}
    assert len(stopped) == 1, f"ranks disagree on the checkpoint step: {stopped}"
    k = stopped.pop()
    assert 20 < k < STEPS
    assert _losses(out1) == reference[:k - 1]   # step k-1 trained and checkpointed; it prints after optimizer.step
    assert (ckpt / "latest").read_text().strip() == f"step-{k}"
    assert (ckpt / "rannc-preempted").read_text().strip() == str(k)
    assert sorted(p.name for p in (ckpt / f"step-{k}").iterdir()) == ["manifest.json", "plan.yaml", "rank-0.pt",
                                                                     "rank-1.pt"]

    code, out2, err2 = _run(tmp_path, 2, "1,1", ckpt)
    assert code == 0, err2[-2000:]
    assert f"resumed at step {k} from" in err2 and "same plan, exact shards" in err2
    assert _losses(out2) == reference, "the resumed run does not continue the uninterrupted trajectory exactly"

    # another world size and plan: the gathered state goes into the new plan
    code, out3, err3 = _run(tmp_path, 3, "2,1", ckpt)
    assert code == 0, err3[-2000:]
    assert f"resumed at step {k} from" in err3 and "state gathered into this plan" in err3
    got = _losses(out3)
    assert [s for s, _ in got] == list(range(STEPS))
    assert got[:k] == reference[:k]
    worst = max(abs(a - b) for (_, a), (_, b) in zip(got[k:], reference[k:]))
    assert worst <= 2e-4, f"gathered resume drifted from the trajectory by {worst}"
    # the per-rank logs hold every rank's output, rank 0's also reached the terminal
    assert (tmp_path / "logs-3" / "rank-2.log").read_text().count("step 0 loss") == 1
    assert "[rank 1]" not in out3


def test_unreadable_checkpoint_is_one_error_line(tmp_path):
    """A checkpoint folder whose `latest` names a missing folder is one clear error line, not a traceback."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "latest").write_text("step-7\n")
    code, out, err = _run(tmp_path, 2, "1,1", ckpt)
    assert code == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines and "unreadable" in lines[0] and "Traceback" not in err, err[-2000:]


def test_incomplete_checkpoints_are_never_resumed_from(tmp_path):
    """A save cut short leaves ``.step-<k>.partial`` (or a step folder without a manifest): the next
    start names it in one line and resumes from ``latest``; its own checkpoint removes the leftovers.
    A truncated shard in the folder ``latest`` names is one error line, exit 2."""
    import json

    ckpt = tmp_path / "ckpt"
    code, _, err = _run(tmp_path, 2, "1,1", ckpt, signal_after="step 10 ")
    assert code == 0, err[-2000:]
    folder = ckpt / (ckpt / "latest").read_text().strip()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["shards"] == {p.name: p.stat().st_size for p in folder.glob("rank-*.pt")}
    assert sorted(manifest["shards"]) == ["rank-0.pt", "rank-1.pt"]
    assert not list(ckpt.glob(".step-*"))  # the partial folder became step-<k>

    partial = ckpt / ".step-999.partial"
    partial.mkdir()
    (partial / "rank-0.pt").write_bytes(b"half a shard")
    orphan = ckpt / "step-998"  # an older layout's folder, cut before its manifest
    orphan.mkdir()
    code, out, err = _run(tmp_path, 2, "1,1", ckpt, signal_after="step 30 ")
    assert code == 0, err[-2000:]
    notes = [line for line in err.splitlines() if "incomplete checkpoint" in line]
    assert len(notes) == 1 and str(partial) in notes[0] and str(orphan) in notes[0], err[-2000:]
    assert f"rannc: resumed at step {manifest['step']} from {folder}" in err
    assert not partial.exists() and not orphan.exists()  # the new checkpoint cleaned them

    folder = ckpt / (ckpt / "latest").read_text().strip()
    shard = folder / "rank-1.pt"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    code, _, err = _run(tmp_path, 2, "1,1", ckpt)
    assert code == 2 and "Traceback" not in err, err[-2000:]
    errors = {line for line in err.splitlines() if line.startswith("error:")}
    assert errors == {f"error: checkpoint {folder} is damaged: rank-1.pt has {size // 2} bytes, the manifest says "
                      f"{size}; restore the folder, or remove {ckpt / 'latest'} to start afresh"}, err[-2000:]


def test_a_truncated_shard_is_one_error_line(tmp_path):
    """save_checkpoint folders have no manifest: a shard torch cannot read is a RanncError, not a traceback."""
    import pytest
    import torch

    from rannc_cli.errors import RanncError
    from rannc_cli.runtime.checkpoint import read_shard

    path = tmp_path / "rank-0.pt"
    torch.save({"format": "rannc-shard", "tensors": {"w": torch.randn(1000)}}, path)
    assert torch.equal(read_shard(path)["tensors"]["w"], torch.load(path)["tensors"]["w"])
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(RanncError, match=r"checkpoint shard .*rank-0.pt is truncated or corrupt"):
        read_shard(path)
