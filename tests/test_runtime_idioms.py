"""Unmodified training-script idioms under `rannc run` give single-process numbers.

One `rannc run --nproc 4` launch trains every case of CASES (real processes, gloo), at 2 and 3
stages with unequal replica counts; each test compares one case's losses, clipping norms, input
gradients, learning rates and final parameters with one plain process (fp32: rtol 1e-5,
atol 1e-6, unless the case says otherwise). Negative cases (clipping by the local norm,
BatchNorm without sync) must fail the same comparison.
"""

from __future__ import annotations

import pytest

from runtime_cases import compare, load_result, train_reference
from test_runtime_equivalence import P, launch


def with_bn(replicas, microbatches, batchnorm):
    return {"plan": P(replicas, microbatches)["plan"], "batchnorm": batchnorm}


CASES = [
    # clip_grad_norm_ over a parameter tied between stage 0 and stage 2, stage 0 replicated
    {"id": "clip_tied_211", "model": "tied_weights", "options": P([2, 1, 1], 2), "clip": {"max_norm": 0.2}},
    # `from torch.nn.utils import clip_grad_norm_` done before RaNNCModule, inf-norm, 2 stages
    {"id": "clip_inf_imported_21", "model": "example_transformer", "options": P([2, 1], 2),
     "clip": {"max_norm": 0.05, "norm_type": "inf", "how": "imported"}},
    # clip_grad_norm_([p for p in model.parameters() if p.grad is not None]): rank 3 holds no stage
    {"id": "clip_filtered_21", "model": "fork_join", "options": P([2, 1], 2),
     "clip": {"max_norm": 0.2, "how": "filtered"}},
    # model.clip_grad_norm_ with a 3-norm, then clip_grad_value_, 3 stages
    {"id": "clip_method_value_121", "model": "fork_join", "options": P([1, 2, 1], 2),
     "clip": {"max_norm": 0.2, "norm_type": 3.0, "how": "method"}, "clip_value": 0.01},
    # HF param groups (no decay for biases/LayerNorm, own lr), LambdaLR, 3-forward accumulation, clipping
    {"id": "hf_groups_sched_accum_121", "model": "example_transformer", "options": P([1, 2, 1], 2),
     "groups": "hf", "scheduler": "lambda", "accumulate": 3, "clip": {"max_norm": 1.0}, "steps": 3},
    # accumulation over 3 forwards of different batches, 2 stages with 2 + 1 replicas
    {"id": "accum_mlp_21", "model": "example_mlp", "options": P([2, 1], 2), "accumulate": 3, "steps": 3},
    # an input that requires grad, read by both stages (skip connection), unequal replicas
    {"id": "input_grad_21", "model": "fork_join", "options": P([2, 1], 2), "input_grad": True},
    {"id": "input_grad_112", "model": "fork_join", "options": P([1, 1, 2], 3), "input_grad": True},
    # bf16 autocast + GradScaler + unscale_ + clip: tracks the reference within bf16 rounding
    {"id": "bf16_scaler_clip_21", "model": "example_mlp", "options": P([2, 1], 2), "autocast": "bf16",
     "scaler": 1024, "clip": {"max_norm": 0.2}},
    # BatchNorm statistics synchronised across replicas (one microbatch): single-device numbers
    {"id": "bn_sync_2", "model": "bn_cnn", "options": with_bn([2], 1, "sync"), "steps": 4},
    {"id": "bn_sync_31", "model": "bn_cnn", "options": with_bn([3, 1], 1, "sync"), "steps": 4},
    {"id": "bn_sync_21_ckpt", "model": "batch_norm", "options": {**with_bn([2, 1], 1, "sync"),
     "checkpoint": "on"}, "steps": 4},
    # sync with 2 microbatches: each microbatch normalised on its own, as single-device accumulation
    {"id": "bn_sync_2_m2", "model": "bn_cnn", "options": with_bn([2], 2, "sync"), "steps": 4,
     "reference_microbatches": 2},
    # an optimizer made after wrapping, from model.parameters(), not handed to RaNNCModule
    {"id": "late_optimizer_21", "model": "example_mlp", "options": P([2, 1], 2), "late_optimizer": True,
     "clip": {"max_norm": 0.1}},
    # negatives: BatchNorm per slice; clipping without the global norm (sabotage, last: it stays on)
    {"id": "neg_bn_local_2", "model": "bn_cnn", "options": {**with_bn([2], 1, "local"), "quiet": False}, "steps": 4},
    {"id": "neg_clip_local_211", "model": "tied_weights", "options": P([2, 1, 1], 2), "clip": {"max_norm": 0.2},
     "sabotage": "local_clip"},
]
EXACT = [c for c in CASES if not c["id"].startswith("neg_") and not c.get("autocast")]


def _keys(case: dict) -> tuple:
    keys = ["losses", "state", "no_grad", "eval"]
    keys += [k for k, flag in (("norms", "clip"), ("input_grads", "input_grad"), ("lrs", "scheduler")) if case.get(flag)]
    return tuple(keys) + (("optimizer",) if case.get("groups") else ())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("idioms")
    proc = launch(tmp, CASES, 4, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (tmp / "out" / "stderr.txt").write_text(proc.stderr)
    return tmp / "out"


@pytest.mark.parametrize("case", EXACT, ids=[c["id"] for c in EXACT])
def test_idiom_equals_single_process(case, results):
    got = load_result(results / f"{case['id']}.pt")
    ref = train_reference(case)
    bad, worst = compare(ref, got, keys=_keys(case))
    assert not bad, f"{case['id']}: {len(bad)} mismatch(es), first: {bad[:3]}"
    assert got["names"] == ref["names"]  # named_parameters() speaks the user's names
    norms = " ".join(f"{a:.6g}/{b:.6g}" for a, b in zip(ref.get("norms", []), got.get("norms", [])))
    print(f"{case['id']}: max abs difference {worst:.3g}" + (f"; norms single/rannc {norms}" if norms else ""))


def test_clipping_really_clips(results):
    """The clip cases' norms exceed max_norm, so the coefficient is < 1 and enters the parameters."""
    for case in CASES:
        if case.get("clip") and not case["id"].startswith("neg_"):
            norms = load_result(results / f"{case['id']}.pt")["norms"]
            assert max(norms) > case["clip"]["max_norm"], (case["id"], norms)


def test_lr_scheduler_sees_its_own_step(results):
    """The runtime's optimizer.step wrapper keeps the scheduler's mark: torch does not warn."""
    assert "has been overridden after learning rate scheduler" not in (results / "stderr.txt").read_text()


def test_batch_norm_per_slice_is_announced(results):
    """Rank 0 says that per-slice BatchNorm statistics differ from one device, and names the option."""
    text = (results / "stderr.txt").read_text()
    assert "BatchNorm statistics are computed per microbatch slice" in text and "batchnorm='sync'" in text
    assert text.count("BatchNorm statistics are computed per microbatch slice") == 1  # only the quiet=False case


def test_bf16_autocast_scaler_clip_tracks_reference(results):
    case = next(c for c in CASES if c["id"] == "bf16_scaler_clip_21")
    bad, _ = compare(train_reference(case), load_result(results / f"{case['id']}.pt"), rtol=2e-2, atol=2e-3,
                     keys=("losses", "state", "norms"))
    assert not bad, bad[:3]


@pytest.mark.parametrize("case_id", ["neg_bn_local_2", "neg_clip_local_211"])
def test_comparison_is_sharp(case_id, results):
    case = next(c for c in CASES if c["id"] == case_id)
    bad, _ = compare(train_reference(case), load_result(results / f"{case_id}.pt"), keys=_keys(case))
    assert bad, f"{case_id}: the per-slice / local-norm run still matched the reference"


def test_forward_returning_logits_is_refused_in_one_line(tmp_path):
    """forward returning (loss, logits): one clear error line on every rank, exit code 2."""
    proc = launch(tmp_path, [{"id": "logits", "model": "loss_and_logits", "options": P([1, 1], 1)}], 2)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert lines and "must return the loss as a single scalar tensor" in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
