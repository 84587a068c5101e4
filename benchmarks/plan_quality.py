"""Plan quality: predicted step of rannc's plan / the best baseline's, per model family and cluster.

    python benchmarks/plan_quality.py

Baselines (rannc_cli/planner/baselines.py): pure data parallel (DDP: all-reduce overlapped with
the backward), uniform layer split, parameter-balanced split (DeepSpeed default), time-balanced
split (torchgpipe balance_by_time), the pipelines 1F1B with the all-reduce after the drain, each
with uniform replicas and its best stage count and microbatch count. All are priced by the same
simulator. Targets: ratio <= 1.0 everywhere, <= 0.9 on the heterogeneous models (ResNet, hybrid).
"search only" is the ratio of the search's own best plan, before `rannc plan` falls back to a
faster baseline (possible when the baseline's stage boundaries fall inside coarsened units).
Profiles are analytic (rannc_cli.planner.synthetic, V100-16GB formulas), 16 GiB GPUs.
"bound" is a lower bound on any plan's step relative to the best baseline: every block's work at
its most efficient per-sample shard size, spread perfectly over all GPUs (no bubbles, no
communication, no memory limit); a ratio target below "bound" is out of reach for every planner.
"""

from __future__ import annotations

import numpy as np

from rannc_cli.planner.cluster import ClusterSpec
from rannc_cli.planner.planner import make_plan
from rannc_cli.planner.synthetic import bert_profile, hybrid_profile, resnet_profile

MODELS = {
    "BERT-class L48 H2048 (2.5B)": lambda: bert_profile(layers=48, hidden=2048, batch_size=512),
    "ResNet-152 x8 filters": lambda: resnet_profile(width=8, depths=(3, 8, 36, 3), batch_size=512),
    "CNN(x4)+Transformer L24 H2048": lambda: hybrid_profile(cnn_width=4, layers=24, hidden=2048, batch_size=512),
    "CNN(x8)+Transformer L24 H2048": lambda: hybrid_profile(cnn_width=8, layers=24, hidden=2048, batch_size=512),
}
CLUSTERS = [(1, 8), (4, 8), (16, 8)]


def compute_bound(cm) -> float:
    """Seconds per step if every block ran at its best per-sample rate on all GPUs at once."""
    sizes = [x for x in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if x <= cm.batch_size]
    rates = []
    for x in sizes:
        f, b, _, _, _ = cm.block_arrays(x)
        rates.append((f + b) / x)
    return float(cm.batch_size * np.min(np.array(rates), axis=0).sum() / cm.cluster.devices)


def main() -> None:
    print(f"{'model':32} {'cluster':>7} {'rannc ms':>9} {'best baseline':>22} {'ratio':>6} {'search only':>11} "
          f"{'bound':>6}  plan")
    for name, make in MODELS.items():
        prof = make()
        for nodes, gpus in CLUSTERS:
            rep = make_plan(prof, ClusterSpec.from_flags(nodes, gpus, "16GiB"))
            feasible = {k: b for k, b in rep.baselines.items() if b is not None}
            step = rep.simulation.step_seconds
            if feasible:
                bname, b = min(feasible.items(), key=lambda kv: kv[1].simulation.step_seconds)
                bs = b.simulation.step_seconds
                best = f"{bname} {1e3 * bs:.1f}"
                ratio = f"{step / bs:.3f}"
                alone = f"{rep.search_step_seconds / bs:.4f}"
                bound = f"{compute_bound(rep.cost_model) / bs:.3f}"
            else:
                best, ratio, alone, bound = "none fits", "-", "-", "-"
            p = rep.plan
            reps = ",".join(str(s.replicas) for s in p.stages[:p.groups])
            sched = p.schedule + (f" v={p.virtual_stages}" if p.virtual_stages > 1 else "") + (" zero1" if p.zero else "")
            print(f"{name:32} {nodes}x{gpus:<5} {1e3 * step:9.1f} {best:>22} {ratio:>6} {alone:>11} {bound:>6}  "
                  f"{p.groups} stages [{reps}] M={p.microbatches} {sched}", flush=True)


if __name__ == "__main__":
    main()
