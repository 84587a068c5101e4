"""How good can any plan be? Proven lower bounds of the plan space, next to rannc's plan and the best baseline.

    python benchmarks/plan_optimum.py                  # every model of plan_quality.py (minutes)
    python benchmarks/plan_optimum.py --models CNN     # names containing "CNN"

For each model and cluster of plan_quality.py, the search runs exactly (no run budget) on single
blocks instead of coarsened units:

- "v1 bound": the space before issue 14 (1F1B or GPipe, no ZeRO, all-reduce after the drain).
  Its objective is a lower bound on a plan's simulated step (GPipe: equal; 1F1B: costmodel.py
  derives the bound; all-reduces of tied parameters only add).
- "v2 DP bound": 1F1B or GPipe with ZeRO-0/1 and the all-reduce overlapped. The overlapped
  objective is not a bound (a later stage's all-reduce may end before the drain), so this run
  uses the search's bound mode: the pipeline term plus only the first stage's exposed
  all-reduce (its last backward ends the pipeline, so that part surely adds).
- interleaved and zb have no closed form in the tool; the only bound covering them is the
  compute bound of plan_quality.py (every block at its best per-sample rate on all GPUs, no
  bubble, communication or memory limit), printed as "compute bound".

All ratios are over the best baseline's simulated step (baselines priced as plan_quality.py says).
"""

from __future__ import annotations

import argparse
import time

from plan_quality import CLUSTERS, MODELS, compute_bound

from rannc_cli.planner.cluster import ClusterSpec
from rannc_cli.planner.costmodel import CostModel
from rannc_cli.planner.planner import make_plan
from rannc_cli.planner.search import SearchSpace, search


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="", help="only models whose name contains this text")
    args = ap.parse_args()
    print(f"{'model':32} {'cluster':>7} {'best baseline ms':>17} {'rannc':>6} {'v1 bound':>8} {'v2 DP bound':>11} "
          f"{'compute bound':>13} {'seconds':>7}")
    for name, make in MODELS.items():
        if args.models and args.models not in name:
            continue
        prof = make()
        for nodes, gpus in CLUSTERS:
            cluster = ClusterSpec.from_flags(nodes, gpus, "16GiB")
            rep = make_plan(prof, cluster)
            feasible = [b.simulation.step_seconds for b in rep.baselines.values() if b is not None]
            if not feasible:
                print(f"{name:32} {nodes}x{gpus:<5} no baseline fits")
                continue
            base = min(feasible)
            t0 = time.perf_counter()
            cm = CostModel(prof, cluster, prof.batch_size)
            blocks = list(range(len(prof.blocks) + 1))
            space = SearchSpace.build(cm, schedules=["1f1b", "gpipe"])
            space.tie = 0.0  # a bound has no one-microbatch tie-break term
            old = search(cm, blocks, space, budget=None)
            space = SearchSpace.build(cm, schedules=["1f1b", "gpipe"], zero=[0, 1], overlap=True)
            space.bound, space.tie = True, 0.0
            new = search(cm, blocks, space, budget=None)
            took = time.perf_counter() - t0
            assert old.exact and new.exact
            print(f"{name:32} {nodes}x{gpus:<5} {1e3 * base:17.1f} {rep.simulation.step_seconds / base:6.3f} "
                  f"{old.lower_bound / base:8.3f} {new.lower_bound / base:11.3f} {compute_bound(cm) / base:13.3f} "
                  f"{took:7.1f}", flush=True)


if __name__ == "__main__":
    main()
