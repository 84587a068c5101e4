"""Write a real estimate-mode profile of a huge BERT-class model for the planner benchmarks.

    python benchmarks/plan_estimate_profile.py [--layers 96] [--hidden 2048] [--out FILE]
    python benchmarks/plan_search_time.py --profile FILE

The model (benchmarks/bert_model.py, sequence 128) is built on the meta device, so no parameter
memory is allocated; `rannc_cli.profiler.build.profile_model(..., mode="estimated")` captures it
and prices every block from shapes with the V100-SXM2-16GB roofline spec. A 96-layer hidden-2048
model has about 4.9B parameters; profiling it takes about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bert_model import BertLike  # noqa: E402

from rannc_cli.profiler.build import profile_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=96)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8, help="captured batch (the planner rescales it)")
    ap.add_argument("--device-spec", default="V100-SXM2-16GB")
    ap.add_argument("--out", default="bert_l96_h2048.estimate.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = BertLike(layers=args.layers, hidden=args.hidden, heads=args.hidden // 128)
        tokens = torch.zeros(args.batch_size, 128, dtype=torch.long)
        labels = torch.zeros(args.batch_size, 128, dtype=torch.long)
    prof, _ = profile_model(model, (tokens, labels), {}, mode="estimated", device_spec=args.device_spec, use_cache=False)
    prof.save(args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {len(prof.blocks)} blocks, {params / 1e9:.2f} B parameters, {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
