"""Profiling benchmarks (issue: capture and profiling). Prints figures and ratios; no assertions.

    python benchmarks/profile_bench.py            # all three, BERT-base width (several minutes on 2 cores)
    python benchmarks/profile_bench.py --quick    # small widths, for a smoke run

1. `rannc --help` wall time (target < 0.3 s), against `python -c pass` measured in the same run.
2. Capture + profile of a 24-layer BERT-base-sized encoder on this CPU (target < 60 s), against
   one eager training step (forward + backward) of the same model and batch.
3. Profiling cost of 48 layers / 4 layers at the same width (target < 1.5); capture time reported too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def wall(cmd: list[str], runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_help() -> None:
    rannc = wall([sys.executable, "-m", "rannc_cli.cli", "--help"])
    python = wall([sys.executable, "-c", "pass"])
    print(f"[help] rannc --help {rannc:.3f} s (target < 0.3 s); bare python start {python:.3f} s; "
          f"ratio {rannc / python:.2f}")


def profile(layers: int, hidden: int, batch_size: int) -> tuple[float, float, float, int, int]:
    import torch

    from bert_model import BertLike, batch
    from rannc_cli.profiler.build import profile_model

    torch.manual_seed(0)
    model = BertLike(layers=layers, hidden=hidden, heads=max(1, hidden // 64))
    args = batch(batch_size)
    t0 = time.perf_counter()
    prof, _ = profile_model(model, args, {}, mode="measured", use_cache=False)
    total = time.perf_counter() - t0
    return total, prof.model["capture_seconds"], prof.device["profiling_seconds"], len(prof.blocks), len(prof.classes)


def eager_step(layers: int, hidden: int, batch_size: int) -> float:
    import torch

    from bert_model import BertLike, batch

    torch.manual_seed(0)
    model = BertLike(layers=layers, hidden=hidden, heads=max(1, hidden // 64))
    tokens, labels = batch(batch_size)
    model(tokens[:1], labels[:1]).backward()  # warm-up
    t0 = time.perf_counter()
    model(tokens, labels).backward()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="hidden 128 instead of 768")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    hidden = 128 if args.quick else 768
    os.environ.setdefault("RANNC_CACHE_DIR", tempfile.mkdtemp(prefix="rannc-bench-"))
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, hidden {hidden}, batch {args.batch_size}")
    bench_help()

    step = eager_step(24, hidden, args.batch_size)
    total, cap, prof_s, blocks, classes = profile(24, hidden, args.batch_size)
    print(f"[bert24] capture+profile {total:.1f} s (target < 60 s): capture {cap:.1f} s, profiling {prof_s:.1f} s, "
          f"{blocks} blocks / {classes} distinct; one eager training step {step:.2f} s; ratio {total / step:.1f} steps")

    small = profile(4, hidden, args.batch_size)
    large = profile(48, hidden, args.batch_size)
    print(f"[scaling] 4 layers: capture {small[1]:.1f} s, profiling {small[2]:.1f} s ({small[3]} blocks / {small[4]} "
          f"distinct); 48 layers: capture {large[1]:.1f} s, profiling {large[2]:.1f} s ({large[3]} blocks / "
          f"{large[4]} distinct)")
    print(f"[scaling] profiling cost 48/4 layers = {large[2] / small[2]:.2f} (target < 1.5); "
          f"capture+profiling 48/4 = {(large[1] + large[2]) / (small[1] + small[2]):.2f}")


if __name__ == "__main__":
    main()
