"""Search time of `rannc plan` for a 96-layer BERT-class model (hidden 2048, ~4.9B parameters).

    python benchmarks/plan_search_time.py [--profile FILE] [--clusters 4x8,32x8,128x8]

Times the library call behind `rannc plan` (coarsening, DP search, simulation of the runners-up),
then separately the baselines. Targets (issue 14, the larger plan space): < 5 s on 32x8 and 128x8,
< 10 s on 512x8, 2 cores.
Uses the analytic profile (rannc_cli.planner.synthetic.bert_profile, V100-16GB formulas) unless
--profile gives a real estimate-mode profile (benchmarks/plan_estimate_profile.py writes one of
the 96-layer model from meta-device shapes). "vs base" = predicted step / best baseline's step.
"""

from __future__ import annotations

import argparse
import time

from rannc_cli.planner.cluster import ClusterSpec
from rannc_cli.planner.planner import make_plan
from rannc_cli.planner.synthetic import bert_profile
from rannc_cli.profiler.format import Profile


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile")
    ap.add_argument("--clusters", default="4x8,32x8,128x8")
    ap.add_argument("--batch-size", type=int, default=512)
    args = ap.parse_args()
    prof = Profile.load(args.profile) if args.profile else bert_profile(layers=96, hidden=2048, batch_size=args.batch_size)
    source = args.profile or "analytic BERT-class L96 H2048 (V100-16GB formulas)"
    print(f"profile: {source}, {len(prof.blocks)} blocks, batch {args.batch_size}")
    print(f"{'cluster':>8} {'search s':>9} {'+sim s':>7} {'baselines s':>12} {'DP runs':>8} {'step ms':>9} {'vs base':>7} {'stages':>6}  replicas")
    for spec in args.clusters.split(","):
        nodes, gpus = (int(x) for x in spec.split("x"))
        cluster = ClusterSpec.from_flags(nodes, gpus, "16GiB")
        t0 = time.perf_counter()
        rep = make_plan(prof, cluster, batch_size=args.batch_size, with_baselines=False)
        total = time.perf_counter() - t0
        t1 = time.perf_counter()
        from rannc_cli.planner.baselines import evaluate_baselines
        from rannc_cli.planner.search import SearchSpace

        bases = evaluate_baselines(rep.cost_model, SearchSpace.build(rep.cost_model).microbatches)
        base = time.perf_counter() - t1
        p = rep.plan
        reps = ",".join(str(s.replicas) for s in p.stages[:p.groups]) + f" {p.schedule}" + \
            (f" v={p.virtual_stages}" if p.virtual_stages > 1 else "") + (" zero1" if p.zero else "")
        steps = [b.simulation.step_seconds for b in bases.values() if b is not None]
        vs = f"{rep.simulation.step_seconds / min(steps):.3f}" if steps else "-"
        print(f"{spec:>8} {rep.search_seconds:9.2f} {total - rep.search_seconds:7.2f} {base:12.2f} {rep.dp_calls:8d} "
              f"{1e3 * rep.simulation.step_seconds:9.1f} {vs:>7} {p.groups:6d}  {reps}", flush=True)


if __name__ == "__main__":
    main()
