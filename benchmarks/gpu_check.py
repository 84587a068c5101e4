"""GPU check of the profiler and cost model: what they predict for one GPU against what it does.

    python benchmarks/gpu_check.py                       # BERT-class L24 H1024, batch 32, on cuda:0
    python benchmarks/gpu_check.py --layers 4 --hidden 256 --batch 8   # a smoke run

On one CUDA device, for the same model and batch:
1. capture + measured profile (`rannc profile --device cuda`): wall time, forward/backward totals;
2. estimate profile (`--estimate`, the device's spec from configs/devices.yaml): the same totals,
   as a ratio to the measured ones (how far the roofline's efficiency factors are off);
3. one eager training step (forward, backward, Adam step; median of --steps after 3 warm-ups)
   and its allocator peak, against the planner's one-GPU prediction (simulate, plan 1x1, one
   microbatch) built on each profile: step-time and peak-memory ratios.
Prints one line per figure and a JSON summary (also to --json-out). No assertions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def eager_step(model, args, steps: int) -> tuple[float, int]:
    import torch

    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    times = []
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for i in range(3 + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(*args)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), int(torch.cuda.max_memory_allocated())


def predict(profile, batch: int, memory: int) -> tuple[float, float]:
    from rannc_cli.planner.cluster import ClusterSpec
    from rannc_cli.planner.costmodel import CostModel
    from rannc_cli.planner.simulate import simulate
    from rannc_cli.runtime.planning import even_plan

    plan = even_plan(len(profile.blocks), [1], 1, batch, "1f1b", gpus_per_node=1)
    sim = simulate(plan, CostModel(profile, ClusterSpec.from_flags(1, 1, memory), batch))
    return sim.step_seconds, sim.memory[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--spec", default="", help="device spec for the estimate (default: from the GPU's name)")
    ap.add_argument("--json-out", default="")
    a = ap.parse_args()

    import torch

    from bert_model import BertLike, batch
    from rannc_cli.profiler.build import profile_model

    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device; this check runs on a GPU machine")
    dev = torch.device("cuda", 0)
    props = torch.cuda.get_device_properties(dev)
    spec = a.spec or ("H200-SXM-141GB" if "H200" in props.name else "H100-SXM5-80GB" if "H100" in props.name
                      else "A100-SXM4-80GB")
    torch.manual_seed(0)
    model = BertLike(layers=a.layers, hidden=a.hidden, heads=max(1, a.hidden // 64)).to(dev)
    args = tuple(t.to(dev) for t in batch(a.batch))
    sizes = sorted({max(1, a.batch // 4), a.batch})
    out: dict = {"device": props.name, "torch": torch.__version__, "model": f"BERT-class L{a.layers} H{a.hidden}",
                 "batch": a.batch, "spec": spec}

    t0 = time.perf_counter()
    measured, _ = profile_model(model, args, {}, mode="measured", use_cache=False, microbatch_sizes=sizes)
    out["measured_profile_wall_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    estimated, _ = profile_model(model, args, {}, mode="estimated", device_spec=spec, use_cache=False,
                                 microbatch_sizes=sizes)
    out["estimate_profile_wall_s"] = time.perf_counter() - t0
    for name, prof in (("measured", measured), ("estimated", estimated)):
        tot = prof.totals(a.batch)
        out[f"{name}_forward_s"], out[f"{name}_backward_s"] = tot["forward_seconds"], tot["backward_seconds"]
    out["blocks"], out["classes"] = len(measured.blocks), len(measured.classes)
    out["estimate_over_measured_forward"] = out["estimated_forward_s"] / out["measured_forward_s"]
    out["estimate_over_measured_backward"] = out["estimated_backward_s"] / out["measured_backward_s"]

    step, peak = eager_step(model, args, a.steps)
    out["eager_step_s"], out["eager_peak_bytes"] = step, peak
    for name, prof in (("measured", measured), ("estimated", estimated)):
        pred_step, pred_mem = predict(prof, a.batch, int(props.total_memory))
        out[f"predicted_step_s_{name}"], out[f"predicted_peak_bytes_{name}"] = pred_step, pred_mem
        out[f"step_ratio_{name}"] = pred_step / step
        out[f"memory_ratio_{name}"] = pred_mem / peak

    for k, v in out.items():
        print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
    print(json.dumps(out))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
