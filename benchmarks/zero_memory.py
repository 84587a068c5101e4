"""ZeRO-1 and the overlapped all-reduce, measured: optimizer state per replica and step time.

    python benchmarks/zero_memory.py                     # MLP 8 x 512, Adam, one stage x 2 and x 4 replicas
    python benchmarks/zero_memory.py --hidden 256 --steps 5 --json out.json

For r = 2 and 4 it launches `rannc run --nproc r` (gloo on loopback, one thread per process) with
a one-stage plan of r replicas, for each of (zero 0, zero 1) x (overlap off, on), and reports:
- the optimizer state held by each replica (bytes of the tensors in its Adam state, ZeRO shards
  included; the state is allocated at the first step and keeps its size, so this is its peak)
  for zero=1 against zero=0 (ratio per replica, target ~1/r);
- the median step time (forward + backward + optimizer step) with the all-reduce overlapped
  with the backward against without (ratio; < 1 means the overlap pays), for zero 0 and 1.
The configurations of one r take turns over --rounds rounds. No assertions; the machine is shared,
so `uptime` is printed beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(args: argparse.Namespace) -> None:
    """One rank of one configuration: train, then rank 0 prints a JSON line."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT / "examples"))
    from mlp import MLP

    from rannc_cli import RaNNCModule
    from rannc_cli.runtime.zero import optimizer_state_bytes

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MLP(d_in=args.hidden, hidden=args.hidden, layers=args.layers, classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    world = int(os.environ["WORLD_SIZE"])
    plan = {"replicas": [world], "microbatches": args.microbatches, "zero": args.zero,
            "allreduce_overlap": bool(args.overlap)}
    wrapped = RaNNCModule(model, opt, plan=plan, quiet=True)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(args.batch, args.hidden, generator=gen), torch.randint(0, 10, (args.batch,), generator=gen)
    times, peak = [], 0
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss = wrapped(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        peak = max(peak, optimizer_state_bytes(opt))
    everyone: list = [None] * world
    dist.all_gather_object(everyone, peak)
    if int(os.environ["RANK"]) == 0:
        print("RESULT " + json.dumps({"step_s": statistics.median(times), "state_bytes": everyone,
                                      "params": sum(p.numel() for p in model.parameters())}), flush=True)


def run_config(args: argparse.Namespace, r: int, zero: int, overlap: bool) -> dict:
    argv = [sys.executable, "-m", "rannc_cli.cli", "run", "--nproc", str(r), __file__, "--", "--worker",
            "--zero", str(zero), "--overlap", str(int(overlap)), "--hidden", str(args.hidden), "--layers",
            str(args.layers), "--batch", str(args.batch), "--microbatches", str(args.microbatches), "--steps",
            str(args.steps), "--warmup", str(args.warmup)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANNC_ALLREDUCE_BUCKET_MB": str(args.bucket_mb)}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1200)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"r={r} zero={zero} overlap={overlap} failed:\n{proc.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--zero", type=int, default=0)
    parser.add_argument("--overlap", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--microbatches", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bucket-mb", type=float, default=1.0, help="allreduce_bucket_mb for the overlap runs")
    parser.add_argument("--replicas", default="2,4")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    summary: dict = {}
    for r in [int(v) for v in args.replicas.split(",")]:
        configs = [(z, o) for z in (0, 1) for o in (False, True)]
        runs: dict = {c: [] for c in configs}
        for _ in range(args.rounds):
            for c in configs:
                runs[c].append(run_config(args, r, *c))
        step = {c: statistics.median(x["step_s"] for x in runs[c]) for c in configs}
        state = {c: runs[c][0]["state_bytes"] for c in configs}
        ratio = [a / b for a, b in zip(state[(1, False)], state[(0, False)])]
        row = {"params": runs[(0, False)][0]["params"], "state_bytes_zero0": state[(0, False)],
               "state_bytes_zero1": state[(1, False)], "state_ratio": ratio,
               "step_ms": {f"zero{z}_overlap{int(o)}": 1e3 * step[(z, o)] for z, o in configs},
               "overlap_ratio_zero0": step[(0, True)] / step[(0, False)],
               "overlap_ratio_zero1": step[(1, True)] / step[(1, False)],
               "zero1_vs_zero0_step": step[(1, False)] / step[(0, False)]}
        summary[f"r{r}"] = row
        print(f"r={r}: {row['params']} parameters; Adam state per replica zero=0 {state[(0, False)]} B, zero=1 "
              f"{state[(1, False)]} B, ratio {', '.join(f'{x:.3f}' for x in ratio)} (target {1 / r:.3f})")
        print(f"r={r}: step ms " + ", ".join(f"{k} {v:.1f}" for k, v in row["step_ms"].items()) +
              f"; overlap/no overlap {row['overlap_ratio_zero0']:.3f} (zero 0), {row['overlap_ratio_zero1']:.3f} "
              f"(zero 1); zero 1/zero 0 {row['zero1_vs_zero0_step']:.3f}")
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
