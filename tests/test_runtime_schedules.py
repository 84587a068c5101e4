"""Interleaved 1F1B (v stages per rank) and ZB-H1 (split backward) train exactly like one process.

One `rannc run --nproc 4` launch trains every case of CASES (real processes, gloo): interleaved
plans with v = 2 chunks per device group (equal and unequal replica counts, one group holding
every stage, microbatch counts that are not a multiple of the group count, checkpointing, a skip
connection and a tied parameter crossing chunks) and ZB-H1 plans at 2 and 3 stages (activation checkpointing,
inputs that require grad, Adam). Each case's losses, final parameters, optimizer state and
input gradients are compared with the single-process reference (rtol 1e-5, atol 1e-6), and each
ZB case with the same plan under 1F1B trained in the same launch (atol 1e-7).
"""

from __future__ import annotations

import pytest

from runtime_cases import compare, load_result, train_reference
from test_runtime_equivalence import launch


def S(replicas, microbatches, schedule, virtual=1, checkpoint=False, zero=0, overlap=False):
    return {"plan": {"replicas": replicas, "microbatches": microbatches, "schedule": schedule,
                     "virtual_stages": virtual, "checkpoint": checkpoint, "zero": zero, "allreduce_overlap": overlap}}


CASES = [
    # 2 groups x 2 replicas, v = 2: 4 stages on 4 ranks; fork_join's skip connection crosses chunks
    {"id": "il_fork_join_22_v2", "model": "fork_join", "options": S([2, 2], 2, "interleaved", 2)},
    # unequal replicas (2 + 1), 3 microbatches (not a multiple of p = 2), checkpointed stages
    {"id": "il_mlp_21_v2_m3_ckpt", "model": "example_mlp", "options": S([2, 1], 3, "interleaved", 2, True)},
    # the embedding/projection tie spans chunk 0 of group 0 and chunk 1 of group 1; Adam state compared
    {"id": "il_tied_11_v2_m3", "model": "tied_weights", "options": S([1, 1], 3, "interleaved", 2),
     "optimizer": "adam"},
    # one group holds all 3 chunks: every value is handed over locally
    {"id": "il_fork_join_1_v3", "model": "fork_join", "options": S([1], 2, "interleaved", 3)},
    # ZB-H1 at 2 stages, 3 microbatches; an input that requires grad
    {"id": "zb_fork_join_11_m3", "model": "fork_join", "options": S([1, 1], 3, "zb"), "input_grad": True},
    {"id": "zb_fork_join_11_m3_1f1b", "model": "fork_join", "options": S([1, 1], 3, "1f1b"), "input_grad": True},
    # ZB-H1 at 3 stages with a replicated first stage, tie, Adam
    {"id": "zb_tied_211_m3", "model": "tied_weights", "options": S([2, 1, 1], 3, "zb"), "optimizer": "adam"},
    {"id": "zb_tied_211_m3_1f1b", "model": "tied_weights", "options": S([2, 1, 1], 3, "1f1b"), "optimizer": "adam"},
    # ZB-H1 with activation checkpointing (recomputed once, at B), 3 stages, 4 microbatches
    {"id": "zb_mlp_111_m4_ckpt", "model": "example_mlp", "options": S([1, 1, 1], 4, "zb", checkpoint=True)},
    {"id": "zb_mlp_111_m4_ckpt_1f1b", "model": "example_mlp", "options": S([1, 1, 1], 4, "1f1b", checkpoint=True)},
    # every issue-14 feature at once: chunks, ZeRO-1 and the overlapped all-reduce (a tie across
    # chunks and groups reduces over the union of its holders while the last backwards run)
    {"id": "il_tied_22_v2_zero_overlap", "model": "tied_weights",
     "options": S([2, 2], 2, "interleaved", 2, zero=1, overlap=True), "optimizer": "adam"},
    {"id": "zb_tied_21_m3_zero_overlap", "model": "tied_weights", "options": S([2, 1], 3, "zb", zero=1, overlap=True),
     "optimizer": "adam"},
]
CHECKED = [c for c in CASES if not c["id"].endswith("_1f1b")]
# last in the launch: the sabotage stays patched for the rest of the worker process
SABOTAGED = {"id": "neg_zb_skip_some_w", "model": "example_mlp", "options": S([1, 1], 3, "zb"), "sabotage": "skip_some_w"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("schedules")
    proc = launch(tmp, [*CASES, SABOTAGED], 4)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp / "out"


@pytest.mark.parametrize("case", CHECKED, ids=[c["id"] for c in CHECKED])
def test_equals_single_process(case, results):
    got = load_result(results / f"{case['id']}.pt")
    keys = ("losses", "state", "no_grad", "eval") + (("optimizer",) if case.get("optimizer") else ()) + \
        (("input_grads",) if case.get("input_grad") else ())
    bad, worst = compare(train_reference(case), got, keys=keys)
    assert not bad, f"{case['id']}: {len(bad)} mismatch(es), first: {bad[:3]}"
    print(f"{case['id']}: max abs difference from one process {worst:.3g}")


@pytest.mark.parametrize("case", [c for c in CASES if c["id"] + "_1f1b" in {d["id"] for d in CASES}],
                         ids=lambda c: c["id"])
def test_zero_bubble_equals_1f1b(case, results):
    """The split backward computes the same numbers as one backward pass (same plan, same launch)."""
    zb = load_result(results / f"{case['id']}.pt")
    plain = load_result(results / f"{case['id']}_1f1b.pt")
    keys = ("losses", "state") + (("optimizer",) if case.get("optimizer") else ()) + \
        (("input_grads",) if case.get("input_grad") else ())
    bad, worst = compare(plain, zb, rtol=0.0, atol=1e-7, keys=keys)
    assert not bad, f"{case['id']}: zb differs from 1f1b: {bad[:3]}"
    print(f"{case['id']}: max abs difference from 1f1b {worst:.3g}")


def test_a_weight_pass_left_out_fails_the_comparison(results):
    """The comparison is sharp for zb: W ops that add nothing to .grad are caught."""
    bad, _ = compare(train_reference(SABOTAGED), load_result(results / f"{SABOTAGED['id']}.pt"), keys=("losses", "state"))
    assert bad, "a zb run without every third W still matched the reference"
