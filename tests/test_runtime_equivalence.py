"""Distributed training under `rannc run` equals single-process training, number by number.

One `rannc run --nproc 4` launch trains every case of CASES (real processes, gloo); each test
compares one case's losses (5 steps), final parameters and buffers (rank 0's full state dict),
no_grad/eval losses, and where asked the optimizer state, with the single-process reference
(fp32: rtol 1e-5, atol 1e-6). A second launch runs sabotaged runtimes (no gradient all-reduce,
a dropped microbatch) and checks that the same comparison fails.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from runtime_cases import compare, load_result, train_reference

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "runtime_worker.py"


def P(replicas, microbatches=2, schedule="1f1b", checkpoint=False):
    return {"plan": {"replicas": replicas, "microbatches": microbatches, "schedule": schedule,
                     "checkpoint": checkpoint}}


CASES = [
    {"id": "fork_join_4x1", "model": "fork_join", "options": P([1, 1, 1, 1], 2)},
    {"id": "tied_211_gpipe_adam", "model": "tied_weights", "options": P([2, 1, 1], 3, "gpipe"), "optimizer": "adam",
     "reload": True},
    {"id": "transformer_2x2_ckpt", "model": "example_transformer", "options": P([2, 2], 2, "1f1b", True)},
    {"id": "multi_output_1x2", "model": "multi_output", "options": P([2], 2)},
    {"id": "nested_1_3_gpipe", "model": "nested_inputs", "options": P([1, 3], 2, "gpipe")},
    {"id": "mlp_1x4", "model": "example_mlp", "options": P([4], 1)},
    {"id": "cnn_112_gpipe_ckpt", "model": "example_cnn", "options": P([1, 1, 2], 2, "gpipe", True)},
    {"id": "in_place_31", "model": "in_place", "options": P([3, 1], 2)},
    {"id": "in_place_2x1_m3", "model": "in_place", "options": P([1, 1], 3)},
    {"id": "mlp_2x2_local_batches", "model": "example_mlp", "options": P([2, 2], 2), "local_batches": True},
    {"id": "fork_join_2x1_scaler", "model": "fork_join", "options": P([1, 1], 2), "scaler": 65536},
    {"id": "mlp_2x2_bf16_scaler", "model": "example_mlp", "options": P([2, 2], 2), "autocast": "bf16",
     "scaler": 1024},
    {"id": "row_weights_31", "model": "row_weights", "options": P([3, 1], 2)},  # input only indexed by rows
    {"id": "batch_norm_2x2", "model": "batch_norm", "options": P([2, 2], 2), "steps": 8},
]
EXACT = [c for c in CASES if not c.get("autocast") and c["model"] != "batch_norm"]

NEGATIVE = [
    {"id": "neg_no_allreduce", "model": "example_mlp", "options": P([2], 1), "sabotage": "no_allreduce"},
    {"id": "neg_drop_microbatch", "model": "example_mlp", "options": P([1, 1], 2), "sabotage": "drop_microbatch"},
]


def launch(tmp: Path, cases: list[dict], nproc: int, *extra: str, env: dict | None = None, worker_args: tuple = (),
           timeout: float = 400) -> subprocess.CompletedProcess:
    """`rannc run --nproc N [extra] tests/runtime_worker.py -- --cases tmp/cases.json --out tmp/out [worker_args]`."""
    import os

    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "cases.json").write_text(json.dumps(cases))
    full_env = {**os.environ, "RANNC_RUNTIME_TIMEOUT": "60", **(env or {})}
    return subprocess.run([sys.executable, "-m", "rannc_cli.cli", "run", "--nproc", str(nproc), *extra, str(WORKER),
                           "--", "--cases", str(tmp / "cases.json"), "--out", str(tmp / "out"), *worker_args],
                          cwd=tmp, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("equivalence")
    proc = launch(tmp, CASES, 4)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp / "out"


@pytest.mark.parametrize("case", EXACT, ids=[c["id"] for c in EXACT])
def test_equals_single_process(case, results):
    got = load_result(results / f"{case['id']}.pt")
    ref = train_reference(case)
    keys = ("losses", "state", "no_grad", "eval", "reloaded") + (("optimizer",) if case.get("optimizer") else ())
    bad, worst = compare(ref, got, keys=keys)
    assert not bad, f"{case['id']}: {len(bad)} mismatch(es), first: {bad[:3]}"
    assert worst < 1e-5
    print(f"{case['id']}: max abs difference {worst:.3g}")


def test_ranks_hold_only_their_stage(results):
    """Rank 0 keeps storage only for its own stage's parameters (pipeline plans)."""
    for case in ("fork_join_4x1", "tied_211_gpipe_adam", "transformer_2x2_ckpt"):
        got = load_result(results / f"{case}.pt")
        assert 0 < got["held_numel"] < got["total_numel"], (case, got["held_numel"], got["total_numel"])


def test_bf16_autocast_with_grad_scaler_tracks_fp32_reference(results):
    case = next(c for c in CASES if c["id"] == "mlp_2x2_bf16_scaler")
    got = load_result(results / f"{case['id']}.pt")
    ref = train_reference(case)  # the same bf16 autocast + GradScaler, in one process
    bad, _ = compare(ref, got, rtol=2e-2, atol=2e-3, keys=("losses", "state"))
    assert not bad, bad[:3]


def test_batch_norm_trains_with_per_microbatch_statistics(results):
    got = load_result(results / "batch_norm_2x2.pt")
    losses = got["losses"]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] * 0.9, losses
    stats = got["state"]["bn1.running_mean"]
    assert stats.abs().sum() > 0 and int(got["state"]["bn1.num_batches_tracked"]) > 0


def test_sabotaged_runtime_fails_the_comparison(tmp_path):
    """The comparison is sharp: a missing all-reduce or a dropped microbatch is caught."""
    proc = launch(tmp_path, NEGATIVE, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case in NEGATIVE:
        bad, _ = compare(train_reference(case), load_result(tmp_path / "out" / f"{case['id']}.pt"),
                         keys=("losses", "state"))
        assert bad, f"{case['id']}: the sabotaged run still matched the reference"
