"""ZeRO-1 and the overlapped all-reduce equal single-process training, number by number.

One `rannc run --nproc 4` launch trains the cases below (real processes, gloo, tiny all-reduce
buckets so that every stage has several); each is compared with the single-process reference
(losses, final parameters, the optimizer's state_dict, clipped norms, learning rates). A second
launch resumes one case from the checkpoint the first saved after step 3 and must continue bit
for bit; ZeRO-1's refusal of an optimizer it cannot shard is checked in process.
"""

from __future__ import annotations

import pytest
import torch

from rannc_cli.errors import RanncError
from rannc_cli.runtime.zero import check_optimizer
from runtime_cases import compare, load_result, train_reference
from test_runtime_equivalence import launch


def Z(replicas, microbatches=2, schedule="1f1b", zero=0, overlap=False, checkpoint=False):
    return {"plan": {"replicas": replicas, "microbatches": microbatches, "schedule": schedule,
                     "checkpoint": checkpoint, "zero": zero, "allreduce_overlap": overlap}}


CLIP = {"max_norm": 0.5}
CASES = [
    # all-reduce overlapped with the backward: a parameter tied across stages, unequal replicas, checkpointing
    {"id": "overlap_tied_211_adam", "model": "tied_weights", "options": Z([2, 1, 1], 3, overlap=True),
     "optimizer": "adam"},
    {"id": "overlap_mlp_2x2_ckpt", "model": "example_mlp", "options": Z([2, 2], 2, overlap=True, checkpoint=True)},
    {"id": "overlap_mlp_31_gpipe", "model": "example_mlp", "options": Z([3, 1], 2, "gpipe", overlap=True)},
    {"id": "plain_mlp_31_gpipe", "model": "example_mlp", "options": Z([3, 1], 2, "gpipe")},  # the same, off
    # ZeRO-1: Adam + scheduler + global clipping; AdamW with decay on a tied parameter; SGD groups, accumulation
    {"id": "zero_mlp_2x2_adam", "model": "example_mlp", "options": Z([2, 2], 2, zero=1), "optimizer": "adam",
     "scheduler": "lambda", "clip": CLIP, "steps": 6},
    {"id": "zero_overlap_mlp_31_adam", "model": "example_mlp", "options": Z([3, 1], 2, zero=1, overlap=True),
     "optimizer": "adam", "scheduler": "lambda", "clip": CLIP},
    {"id": "zero_tied_211_adamw", "model": "tied_weights", "options": Z([2, 1, 1], 3, zero=1, overlap=True),
     "optimizer": "adamw", "clip": CLIP},
    {"id": "zero_mlp_2x2_sgd_groups", "model": "example_mlp", "options": Z([2, 2], 2, zero=1),
     "groups": "hf", "scheduler": "lambda", "accumulate": 2},
    # RMSprop turns rounding-level gradient differences of near-zero elements into lr-sized steps
    # (the plain runtime differs from one process by 4e-5 here): compared with the plain runtime instead
    {"id": "zero_mlp_2x2_rmsprop", "model": "example_mlp", "options": Z([2, 2], 2, zero=1, overlap=True),
     "optimizer": "rmsprop", "versus": "plain_mlp_2x2_rmsprop"},
    {"id": "plain_mlp_2x2_rmsprop", "model": "example_mlp", "options": Z([2, 2], 2), "optimizer": "rmsprop",
     "baseline": True},
    {"id": "zero_mlp_31_adagrad", "model": "example_mlp", "options": Z([3, 1], 2, zero=1), "optimizer": "adagrad"},
    {"id": "zero_mlp_4_scaler", "model": "example_mlp", "options": Z([4], 2, zero=1, overlap=True),
     "optimizer": "adam", "scaler": 1024, "clip": CLIP},
]
KEYS = ("losses", "state", "optimizer", "norms", "lrs")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One launch trains every case; each saves a sharded checkpoint after step 3 (for the resume test)."""
    tmp = tmp_path_factory.mktemp("zero")
    proc = launch(tmp, CASES, 4, env={"RANNC_ALLREDUCE_BUCKET_MB": "0.002"},  # ~2 KiB buckets
                  worker_args=("--save-at", "3"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp


CHECKED = [c for c in CASES if not c.get("baseline")]


@pytest.mark.parametrize("case", CHECKED, ids=[c["id"] for c in CHECKED])
def test_zero_and_overlap_equal_single_process(case, trained):
    got = load_result(trained / "out" / f"{case['id']}.pt")
    ref = train_reference(case)
    if case.get("versus"):  # the plain runtime's numbers, to rounding
        ref = load_result(trained / "out" / f"{case['versus']}.pt")
        bad, worst = compare(ref, got, rtol=0, atol=1e-7, keys=("losses", "state", "optimizer"))
        assert not bad, f"{case['id']}: {len(bad)} mismatch(es), first: {bad[:3]}"
        return
    keys = tuple(k for k in KEYS if k in ("losses", "state", "optimizer") or case.get(
        {"norms": "clip", "lrs": "scheduler"}[k]))
    bad, worst = compare(ref, got, keys=keys)
    assert not bad, f"{case['id']}: {len(bad)} mismatch(es), first: {bad[:3]}"
    assert worst < 1e-5, (case["id"], worst)
    print(f"{case['id']}: max abs difference {worst:.3g}")
    if case["options"]["plan"]["zero"]:  # every element's optimizer state is held by one replica only
        full = sum(v.numel() * v.element_size() for st in ref["optimizer"]["state"].values()
                   for k, v in st.items() if k != "step")
        held = sum(got["state_bytes_by_rank"])
        steps = 4 * 64 * len(ref["optimizer"]["state"])  # step counters: a few bytes per parameter and shard
        assert full <= held <= full + steps, (case["id"], full, held)
    if case["options"]["plan"]["allreduce_overlap"]:  # rank 0's buckets start during its backward
        early, total = got["buckets"]
        assert total >= 2 and early >= total - 1, (case["id"], early, total)


def test_overlap_gives_the_numbers_of_the_plain_reducer(trained):
    on = load_result(trained / "out" / "overlap_mlp_31_gpipe.pt")
    off = load_result(trained / "out" / "plain_mlp_31_gpipe.pt")
    assert on["losses"] == off["losses"]
    worst = max(float((v - off["state"][k]).abs().max()) for k, v in on["state"].items())
    assert worst <= 1e-7, worst
    print(f"overlap vs plain reducer: max abs difference {worst:.3g}")


def test_zero_checkpoint_resumes_the_exact_trajectory(trained, tmp_path):
    """Resume the tied AdamW case (ZeRO-1 + overlap) from its step-3 checkpoint: the same numbers bit for bit."""
    case = next(c for c in CASES if c["id"] == "zero_tied_211_adamw")
    ckpt = trained / "out" / f"{case['id']}-ckpt"
    resumed_case = dict(case, start=3, steps=2, options={})  # the plan (zero: 1) comes from the checkpoint
    resumed = launch(tmp_path, [resumed_case], 4, worker_args=("--resume", str(ckpt)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_result(trained / "out" / f"{case['id']}.pt")
    b = load_result(tmp_path / "out" / f"{case['id']}.pt")
    assert a["losses"][3:] == b["losses"], (a["losses"], b["losses"])
    for k, v in a["state"].items():
        assert torch.equal(v, b["state"][k]), k
    assert sorted(a["optimizer"]["state"]) == sorted(b["optimizer"]["state"])
    for idx, st in a["optimizer"]["state"].items():
        for name, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][idx][name]), (idx, name)


def test_zero_refuses_an_optimizer_that_is_not_elementwise():
    """Optimizers whose update mixes elements (Adafactor's factored moments, a user subclass's own
    step) cannot be stepped slice by slice: one error line names the class and what to do."""
    class MyAdam(torch.optim.Adam):
        pass

    w = torch.nn.Parameter(torch.zeros(3))
    for opt in (torch.optim.Adafactor([w]), MyAdam([w])):
        with pytest.raises(RanncError) as err:
            check_optimizer(opt)
        line = err.value.one_line()
        assert type(opt).__name__ in line and "zero: 0" in line and "\n" not in line, line
    for cls in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad):
        check_optimizer(cls([w], lr=0.1))
