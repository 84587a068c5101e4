"""A checkpointed interleaved or ZB-H1 run resumes bit for bit, like a run that never stopped.

    pytest -q tests/test_runtime_resume_schedules.py

One `rannc run --nproc 2` launch trains every case of CASES (Adam, mlp) for 6 steps and saves a
sharded checkpoint after step 3; a second launch resumes each case from it and trains steps 3..5.
The resumed losses, final parameters and every number of the optimizer state must equal those of
the uninterrupted run exactly. Interleaved plans put several stages on one rank (one group with
v = 2 and v = 4 chunks, two groups with v = 2).
"""

from __future__ import annotations

import pytest
import torch

from runtime_cases import load_result
from test_runtime_equivalence import launch


def S(replicas, microbatches, schedule, virtual=1, checkpoint=False):
    return {"plan": {"replicas": replicas, "microbatches": microbatches, "schedule": schedule,
                     "virtual_stages": virtual, "checkpoint": checkpoint}}


CASES = [
    {"id": "il_mlp_11_v2_m3", "model": "example_mlp", "options": S([1, 1], 3, "interleaved", 2)},
    {"id": "il_mlp_2_v2_m2", "model": "example_mlp", "options": S([2], 2, "interleaved", 2)},
    # the plan the planner had picked for the PBS resume test: one group of 2, v = 4, 1 microbatch
    {"id": "il_mlp_2_v4_m1", "model": "example_mlp", "options": S([2], 1, "interleaved", 4)},
    {"id": "zb_mlp_11_m3", "model": "example_mlp", "options": S([1, 1], 3, "zb")},
]
for _case in CASES:
    _case.update(optimizer="adam", steps=6)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(uninterrupted results, resumed results) folders."""
    full = tmp_path_factory.mktemp("full")
    proc = launch(full, CASES, 2, worker_args=("--save-at", "3"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = tmp_path_factory.mktemp("resumed")
    for case in CASES:  # the plan comes from the checkpoint
        again = dict(case, start=3, steps=3, options={})
        proc = launch(resumed / case["id"], [again], 2,
                      worker_args=("--resume", str(full / "out" / f"{case['id']}-ckpt")))
        assert proc.returncode == 0, proc.stderr[-4000:]
    return full / "out", resumed


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_resume_continues_the_exact_trajectory(case, runs):
    full, resumed = runs
    a = load_result(full / f"{case['id']}.pt")
    b = load_result(resumed / case["id"] / "out" / f"{case['id']}.pt")
    assert a["losses"][3:] == b["losses"], (a["losses"], b["losses"])
    for k, v in a["state"].items():
        assert torch.equal(v, b["state"][k]), (k, float((v - b["state"][k]).abs().max()))
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert sorted(a["optimizer"]["state"]) == sorted(b["optimizer"]["state"])
    for idx, st in a["optimizer"]["state"].items():
        for name, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][idx][name]), (idx, name)
