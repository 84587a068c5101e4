"""How good can any plan be? The proven optimum of the plan space, next to rannc's plan and the best baseline.

    python benchmarks/plan_optimum.py                  # every model of plan_quality.py (minutes)
    python benchmarks/plan_optimum.py --models Hybrid  # names containing "Hybrid" or "CNN"

For each model and cluster of plan_quality.py, the search runs exactly (no run budget) on single
blocks instead of coarsened units, with both schedules: its optimum is the least search objective
over every plan of the space (contiguous stages at block boundaries, per-stage replicas from the
candidates, microbatch counts, 1F1B or GPipe, checkpointing where needed). The objective is a
lower bound on a plan's simulated step (GPipe: equal; 1F1B: costmodel.py derives the bound;
all-reduces of tied parameters only add), so "optimum / best baseline" bounds the ratio any plan
of this space can reach under the cost model. Prints the bound, rannc's ratio (`rannc plan`) and
the simulated ratio of the optimum's own plan.
"""

from __future__ import annotations

import argparse
import time

from plan_quality import CLUSTERS, MODELS

from rannc_cli.planner.cluster import ClusterSpec
from rannc_cli.planner.costmodel import CostModel
from rannc_cli.planner.planner import candidate_plan, make_plan
from rannc_cli.planner.search import SearchSpace, search
from rannc_cli.planner.simulate import simulate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="", help="only models whose name contains this text")
    args = ap.parse_args()
    print(f"{'model':32} {'cluster':>7} {'best baseline ms':>17} {'rannc':>6} {'optimum bound':>13} "
          f"{'optimum simulated':>17} {'seconds':>7}")
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
            res = search(cm, list(range(len(prof.blocks) + 1)), SearchSpace.build(cm, schedules=["1f1b", "gpipe"]),
                         budget=None)
            took = time.perf_counter() - t0
            assert res.best is not None and res.exact
            own = simulate(candidate_plan(res.best, cm), cm).step_seconds
            print(f"{name:32} {nodes}x{gpus:<5} {1e3 * base:17.1f} {rep.simulation.step_seconds / base:6.3f} "
                  f"{res.lower_bound / base:13.3f} {own / base:17.3f} {took:7.1f}", flush=True)


if __name__ == "__main__":
    main()
