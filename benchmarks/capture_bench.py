"""Capture + profile cost against depth, whole-model export vs reused layers, in one run.

    python benchmarks/capture_bench.py                  # 4 vs 48 layers (hidden 128), 96 layers hidden 1024
    python benchmarks/capture_bench.py --runs 3 --skip-big       # or --only-big
    python benchmarks/capture_bench.py --runs 3 --old-runs 0 --skip-big   # the new path only

Model: examples/transformer_lm.py (GPT-style pre-norm encoder stack, tied head, causal mask,
padding mask as a keyword), vocabulary 512, sequence 32, heads hidden/64; batch 8 for hidden 128,
batch 4 for hidden 1024. Each configuration runs `profile_model(..., use_cache=False)` in
measured and in estimate mode, on the old path (`RANNC_CAPTURE_REUSE_LAYERS=0`: the whole-model
export, and measured mode's op-by-op input pass over every op, as before the one-block-per-class
pass) and on the new one (`=1`: graph/reuse.py, and the input pass computing one block per
class), and reports medians of the wall time (capture + profile), of the capture part, and of
the process's CPU time (less disturbed than wall time by other jobs on a shared machine).
Targets (issue 12): 48 layers <= 1.3x the cost of 4 layers; 96 layers of hidden 1024 under 10 s;
and the same graph hash both ways (checked here, and in tests/test_capture_reuse.py). No assertions: figures only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))


def model_and_batch(layers: int, hidden: int, batch: int):
    import torch

    import transformer_lm as ex

    torch.manual_seed(0)
    model = ex.TransformerLM(vocab=512, d_model=hidden, heads=max(1, hidden // 64), layers=layers, seq_len=32)
    tokens, targets, padding = next(ex.batches(1, batch, 32, 512, 0))
    return model, (tokens, targets), {"padding": padding}


def profile_once(model, args, kwargs, mode: str, reuse: bool) -> tuple[float, float, str, str, float]:
    from rannc_cli.profiler import build

    os.environ["RANNC_CAPTURE_REUSE_LAYERS"] = "1" if reuse else "0"
    stand_ins = build.stand_ins
    if not reuse:
        build.stand_ins = lambda *_: None  # the old path: the input pass runs every op
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        prof, _ = build.profile_model(model, args, kwargs, mode=mode, use_cache=False)
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        build.stand_ins = stand_ins
    return total, float(prof.model["capture_seconds"]), prof.model["graph_hash"], \
        f"{len(prof.blocks)}/{len(prof.classes)}", cpu


def measure(model, args, kwargs, mode: str, reuse: bool, runs: int) -> dict:
    results = [profile_once(model, args, kwargs, mode, reuse) for _ in range(runs)]
    return {"total": statistics.median(r[0] for r in results), "capture": statistics.median(r[1] for r in results),
            "hash": {r[2] for r in results}, "blocks": results[0][3], "runs": runs,
            "cpu": statistics.median(r[4] for r in results),
            "all": [round(r[0], 1) for r in results]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3, help="runs per configuration (medians reported)")
    parser.add_argument("--old-runs", type=int, default=None,
                        help="runs of the old path on the 4- and 48-layer models (default: --runs; 0: skip it)")
    parser.add_argument("--old-big-runs", type=int, default=1,
                        help="runs of the old path on the 96-layer model (0: skip it, only the new path)")
    parser.add_argument("--skip-big", action="store_true", help="skip the 96-layer hidden-1024 model")
    parser.add_argument("--only-big", action="store_true", help="only the 96-layer hidden-1024 model")
    opts = parser.parse_args()
    os.environ.setdefault("RANNC_CACHE_DIR", tempfile.mkdtemp(prefix="rannc-bench-"))
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    table: dict = {}
    configs = ([] if opts.only_big else [(4, 128, 8), (48, 128, 8)]) + ([] if opts.skip_big else [(96, 1024, 4)])
    for layers, hidden, batch in configs:
        model, args, kwargs = model_and_batch(layers, hidden, batch)
        for mode in ("measured", "estimated"):
            for reuse in (False, True):
                old_runs = opts.runs if opts.old_runs is None else opts.old_runs
                runs = opts.runs if reuse else opts.old_big_runs if layers == 96 else old_runs
                if runs == 0:
                    continue
                r = measure(model, args, kwargs, mode, reuse, runs)
                table[(layers, hidden, mode, reuse)] = r
                print(f"L{layers} H{hidden} b{batch} {mode:9s} {'reused' if reuse else 'whole ':6s}: total "
                      f"{r['total']:.1f} s (capture {r['capture']:.1f} s; runs {r['all']}; CPU {r['cpu']:.1f} s), blocks/classes "
                      f"{r['blocks']}, graph {','.join(sorted(r['hash']))}", flush=True)
        del model
    print(f"load average now {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for mode in ("measured", "estimated"):
        for reuse in (False, True) if not opts.only_big else ():
            if (4, 128, mode, reuse) not in table:
                continue
            small, large = table[(4, 128, mode, reuse)], table[(48, 128, mode, reuse)]
            print(f"[ratio] {mode:9s} {'reused' if reuse else 'whole ':6s}: 48/4 layers capture+profile "
                  f"{large['total'] / small['total']:.2f} (target <= 1.3), capture alone "
                  f"{large['capture'] / small['capture']:.2f}, CPU time {large['cpu'] / small['cpu']:.2f}")
        if not opts.skip_big:
            old, new = table.get((96, 1024, mode, False)), table[(96, 1024, mode, True)]
            before = f"whole-model path {old['total']:.1f} s (capture {old['capture']:.1f} s), " if old else ""
            print(f"[96xH1024] {mode:9s}: {before}reused layers {new['total']:.1f} s (capture {new['capture']:.1f} s, "
                  f"CPU {new['cpu']:.1f} s) "
                  f"(target < 10 s)" + (f"; same graph: {old['hash'] == new['hash']}" if old else ""))
    for layers in (4, 48) if not opts.only_big else ():
        for mode in ("measured", "estimated"):
            if (layers, 128, mode, False) not in table:
                continue
            same = table[(layers, 128, mode, False)]["hash"] == table[(layers, 128, mode, True)]["hash"]
            print(f"[graph] L{layers} {mode}: same graph hash both ways: {same}")


if __name__ == "__main__":
    main()
