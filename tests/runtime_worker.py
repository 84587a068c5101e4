"""A training script the runtime tests launch with `rannc run`: trains several cases in one launch.

    rannc run --nproc 4 tests/runtime_worker.py -- --cases cases.json --out DIR

Every case builds a zoo model (dropout off), wraps it in RaNNCModule with the case's options,
trains ``steps`` steps on a fixed batch and, on rank 0, saves losses, the full state dict, the
optimizer state dict and the eval/no_grad losses to DIR/<id>.pt. tests/runtime_cases.py computes
the single-process reference for the same case and compares number by number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import runtime_cases as rc  # noqa: E402


def sabotage(kind: str) -> None:
    """Break the runtime on purpose so that the equivalence check must fail (negative tests)."""
    if kind == "no_allreduce":
        from rannc_cli.runtime.allreduce import GradReducer

        GradReducer.start = lambda self: None  # type: ignore[method-assign]
    elif kind == "local_clip":
        from rannc_cli.runtime import clipping

        clipping.engine_of = lambda parameters: None  # type: ignore[assignment]  # torch's per-rank norm
    elif kind == "skip_some_w":
        from rannc_cli.runtime.split_backward import WeightGrad

        run, calls = WeightGrad.run, [0]

        def skipping(self):  # type: ignore[no-untyped-def]  # every third W adds nothing to .grad
            calls[0] += 1
            if calls[0] % 3:
                run(self)

        WeightGrad.run = skipping  # type: ignore[method-assign]
    elif kind == "drop_microbatch":
        from rannc_cli.runtime.executor import Executor

        original = Executor._backward

        def backward(self, stage, inputs, outputs, m, *rest):  # type: ignore[no-untyped-def]
            if m == 1:  # the last microbatch's gradients never reach the parameters
                with torch.no_grad():
                    grads = {p: (p.grad.clone() if p.grad is not None else None) for p in stage.parameters()}
                original(self, stage, inputs, outputs, m, *rest)
                for p, g in grads.items():
                    p.grad = g
                return
            original(self, stage, inputs, outputs, m, *rest)

        Executor._backward = backward  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--fail-rank", type=int, default=-1, help="this rank raises at step 2 (fault tests)")
    parser.add_argument("--hang-rank", type=int, default=-1, help="this rank stops answering at step 2 (fault tests)")
    parser.add_argument("--signal-rank", type=int, default=-1, help="this rank signals itself at step 2 (fault tests)")
    parser.add_argument("--signal", default="STOP", help="the signal --signal-rank sends itself: STOP or KILL")
    parser.add_argument("--resume", default="", help="load this checkpoint before the first forward")
    parser.add_argument("--save-at", type=int, default=-1, help="save a sharded checkpoint after this many steps")
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    out = Path(args.out)
    for case in json.loads(Path(args.cases).read_text()):
        if case.get("sabotage"):
            sabotage(case["sabotage"])
        started = time.perf_counter()
        result = rc.train_distributed(case, rank, fail_rank=args.fail_rank, hang_rank=args.hang_rank, resume=args.resume,
                                      signal_rank=args.signal_rank, signal_name=args.signal,
                                      save_at=args.save_at, checkpoint_dir=out / f"{case['id']}-ckpt")
        result["wall_seconds"] = time.perf_counter() - started  # capture, planning and training of this case
        if rank == 0:
            rc.save_result(result, out / f"{case['id']}.pt")


if __name__ == "__main__":
    main()
