"""Scale: the largest BERT-class model (layers at hidden 2048) that fits 32 nodes x 8 x 16 GiB,
with rannc's plans versus pure data parallel.  Target: >= 5x the parameters.

    python benchmarks/plan_scale.py [--nodes 32] [--gpus 8] [--batch-size 512]

"Fits" = some plan of the search space fits every GPU's memory (parameters, gradients, Adam state
x2, activations of the in-flight microbatches, checkpointing allowed), searched with the default
24 units; pure data parallel = one stage on every GPU, any microbatch count (gradient accumulation).
"""

from __future__ import annotations

import argparse

from rannc_cli.planner.baselines import _plan
from rannc_cli.planner.cluster import ClusterSpec
from rannc_cli.planner.coarsen import coarsen
from rannc_cli.planner.costmodel import CostModel
from rannc_cli.planner.search import SearchSpace, feasible
from rannc_cli.planner.synthetic import bert_profile


def params(layers: int) -> float:
    prof = bert_profile(layers=layers, hidden=2048, batch_size=8)
    return prof.param_bytes(range(len(prof.blocks)), trainable_only=True) / 4


def largest(fits, lo: int = 1, hi: int = 8192) -> int:
    """Largest layer count with fits(layers) true (fits is monotone)."""
    if not fits(lo):
        return 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=32)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--units", type=int, default=24)
    args = ap.parse_args()
    cluster = ClusterSpec.from_flags(args.nodes, args.gpus, "16GiB")

    def rannc_fits(layers: int) -> bool:
        cm = CostModel(bert_profile(layers=layers, hidden=2048, batch_size=args.batch_size), cluster)
        return feasible(cm, coarsen(cm, args.units), SearchSpace.build(cm))

    def dp_fits(layers: int) -> bool:
        cm = CostModel(bert_profile(layers=layers, hidden=2048, batch_size=args.batch_size), cluster)
        return any(_plan(cm, [0, cm.n], cluster.devices, m) is not None
                   for m in SearchSpace.build(cm).microbatches if cluster.devices <= cm.microbatch(m))

    dp = largest(dp_fits, hi=256)
    ours = largest(rannc_fits, lo=max(dp, 1))
    print(f"cluster {args.nodes}x{args.gpus} x 16 GiB, batch {args.batch_size}, {args.units} units")
    print(f"pure data parallel: {dp} layers, {params(dp) / 1e9:.2f} B parameters")
    print(f"rannc:              {ours} layers, {params(ours) / 1e9:.2f} B parameters")
    print(f"ratio:              {params(ours) / params(dp):.1f}x")


if __name__ == "__main__":
    main()
