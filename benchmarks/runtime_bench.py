"""Runtime benchmarks (issue 4): rannc's pipeline against its baselines, measured side by side in one run.

    python benchmarks/runtime_bench.py          # MLP 8 x 1024, batch 2048, 16 microbatches, 1F1B (~2 min on 2 cores)
    python benchmarks/runtime_bench.py --batch 256 --microbatches 4 --rounds 5 --json out.json

Every measurement runs in fresh processes with one thread each (torch.set_num_threads(1) and
OMP_NUM_THREADS=1, baselines included), one configuration at a time, and the configurations take
turns over ``--rounds`` rounds; each figure is the median over rounds of the mean step time of the
timed steps (after ``--warmup`` steps). A step is forward + backward + optimizer step (SGD).

Figures and targets:
- rannc 2-stage pipeline vs torch.distributed.pipelining with the same split and schedule
  (throughput ratio, target >= 1.0);
- rannc 2-stage pipeline vs one process training the same model on the same batch (speedup,
  target >= 1.7);
- rannc 1 stage x 1 replica (the distributed engine forced on in a world of one) vs plain PyTorch
  (overhead, target <= 3%);
- the planner's predicted step time for the pipeline's plan (a profile measured here with one
  thread, links measured over gloo on loopback by rannc_cli/topology/measure.py) vs the measured
  step (target: within 15%).
It prints `uptime` before and after: the machine is shared, so the load goes with the figures. It
also prints each configuration's CPU time per step (process CPU, all threads; for pipelines the sum
over ranks and the busiest rank), which other processes' load does not inflate: total pipeline work
relative to one process, and one process's CPU over the busiest rank's (the speedup with a free core
per rank).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

ROLES = ("plain", "rannc1", "rannc2", "torchpipe2")


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


# ---------------------------------------------------------------------------- model and data
def _model(args):
    import torch

    from mlp import MLP

    torch.manual_seed(0)
    return MLP(d_in=args.d_in, hidden=args.hidden, layers=args.layers, classes=10)


def _batch(args):
    import torch

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.d_in, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    return x, y


def _timed(step, args) -> dict:
    for _ in range(args.warmup):
        step()
    times = []
    c0 = time.process_time()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    cpu = (time.process_time() - c0) / args.steps  # this process's CPU seconds per step (all its threads)
    return {"step_s": statistics.mean(times), "cpu_s": cpu, "steps": times, "loss": float(loss)}


# ---------------------------------------------------------------------------- roles (one per process set)
def role_plain(args) -> dict:
    import torch

    model = _model(args)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = _batch(args)

    def step():
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    return _timed(step, args)


def _rannc(args, plan: dict, forced_env=None) -> dict:
    import torch

    from rannc_cli import RaNNCModule

    model = _model(args)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    wrapped = RaNNCModule(model, opt, plan=plan, quiet=True)
    if forced_env is not None:  # a world of one runs plain PyTorch; force the engine on for the overhead figure
        wrapped._env = forced_env
    x, y = _batch(args)

    def step():
        loss = wrapped(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    out = _timed(step, args)
    if forced_env is None:
        import torch.distributed as dist

        out["rank"] = dist.get_rank()
    return out


def role_rannc1(args) -> dict:
    from rannc_cli.runtime.env import DistEnv

    env = DistEnv(0, 1, 0, 1, "127.0.0.1", int(os.environ["MASTER_PORT"]), "bench")
    return _rannc(args, {"replicas": [1], "microbatches": 1}, forced_env=env)


def role_rannc2(args) -> dict:
    # blocks of examples/mlp.py: two per layer (Linear, ReLU), then head and the loss; cut before layer L/2
    return _rannc(args, {"replicas": [1, 1], "microbatches": args.microbatches, "schedule": args.schedule,
                         "bounds": [2 * (args.layers // 2)]})


def role_torchpipe2(args) -> dict:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, SplitPoint, pipeline

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mlp = _model(args)

    class Logits(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.layers, self.head = inner.layers, inner.head

        def forward(self, x):
            return self.head(self.layers(x))

    x, y = _batch(args)
    mb = args.batch // args.microbatches
    pipe = pipeline(Logits(mlp), mb_args=(x[:mb],), split_spec={f"layers.{args.layers // 2}": SplitPoint.BEGINNING})
    stage = pipe.build_stage(rank, torch.device("cpu"))
    kind = Schedule1F1B if args.schedule == "1f1b" else ScheduleGPipe

    def loss_fn(out, target):
        return F.cross_entropy(out, target) / args.microbatches  # mean over the batch, as one process computes it

    schedule = kind(stage, n_microbatches=args.microbatches, loss_fn=loss_fn)
    opt = torch.optim.SGD(stage.submod.parameters(), lr=1e-3)
    last = rank == world - 1

    def step():
        losses: list = []
        if rank == 0:
            schedule.step(x)
        else:
            schedule.step(target=y, losses=losses)
        opt.step()
        opt.zero_grad()
        return sum(float(v) for v in losses) if last else 0.0

    out = _timed(step, args)
    out["rank"] = rank
    dist.destroy_process_group()
    return out


# ---------------------------------------------------------------------------- orchestration
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(role: str, nproc: int, args) -> dict:
    port = str(_free_port())
    procs = []
    for rank in range(nproc):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "PYTHONUNBUFFERED": "1"}
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            env.pop(k, None)
        if nproc > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc))
        argv = [sys.executable, __file__, "--role", role, *args.passthrough]
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        if p.returncode != 0:
            raise SystemExit(f"runtime_bench: role {role} failed (exit {p.returncode}): {err.strip()[-2000:]}")
        line = next(l for l in out.splitlines() if l.startswith("RESULT "))
        results.append(json.loads(line[len("RESULT "):]))
    if nproc == 1:
        return {**results[0], "cpu_max_s": results[0]["cpu_s"]}
    return {"step_s": max(r["step_s"] for r in results), "cpu_s": sum(r["cpu_s"] for r in results),
            "cpu_max_s": max(r["cpu_s"] for r in results), "ranks": results,
            "loss": next((r["loss"] for r in results if r["loss"]), 0.0)}


def _prediction(args) -> dict:
    """Profile here (one thread), measure gloo loopback links, simulate the pipeline's plan."""
    import torch

    _one_thread()
    from rannc_cli.planner.cluster import ClusterSpec, Link
    from rannc_cli.planner.costmodel import CostModel
    from rannc_cli.planner.simulate import simulate
    from rannc_cli.profiler.build import profile_model
    from rannc_cli.runtime.planning import even_plan
    from rannc_cli.topology import measure

    links = measure.run_local(2, nbytes=4 << 20, iters=5)
    kinds = {}
    for kind in ("intra_node", "allreduce_intra"):
        r = links[kind]
        kinds[kind] = Link(float(r["bandwidth"]), float(r["latency"]), "measured")
    kinds["inter_node"], kinds["allreduce_inter"] = kinds["intra_node"], kinds["allreduce_intra"]
    cluster = ClusterSpec(1, 2, 8 << 30, kinds, "cpu", "bench")
    model = _model(args)
    x, y = _batch(args)
    os.environ.setdefault("RANNC_PROFILE_REPEATS", "5")
    profile, _ = profile_model(model, (x, y), {}, mode="measured", use_cache=False,
                               microbatch_sizes=[args.batch // args.microbatches, args.batch])
    n = len(profile.blocks)
    plan = even_plan(n, [1, 1], args.microbatches, args.batch, args.schedule, bounds=[2 * (args.layers // 2)],
                     gpus_per_node=2)
    sim = simulate(plan, CostModel(profile, cluster, args.batch))
    one = even_plan(n, [1], 1, args.batch, args.schedule, gpus_per_node=2)
    sim1 = simulate(one, CostModel(profile, cluster, args.batch))
    del torch
    return {"predicted_step_s": sim.step_seconds if hasattr(sim, "step_seconds") else sim[0],
            "predicted_single_s": sim1.step_seconds if hasattr(sim1, "step_seconds") else sim1[0],
            "links": {k: {"bandwidth": v.bandwidth, "latency": v.latency} for k, v in kinds.items()}}


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "uptime unavailable"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=ROLES)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-in", dest="d_in", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--microbatches", type=int, default=16)
    parser.add_argument("--schedule", choices=("1f1b", "gpipe"), default="1f1b")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default=",".join(ROLES) + ",predict", help="comma list of roles (and 'predict')")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    args.passthrough = [f"--hidden={args.hidden}", f"--layers={args.layers}", f"--d-in={args.d_in}",
                        f"--batch={args.batch}", f"--microbatches={args.microbatches}", f"--schedule={args.schedule}",
                        f"--steps={args.steps}", f"--warmup={args.warmup}"]
    if args.role:
        _one_thread()
        if args.role == "rannc1":
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        result = globals()[f"role_{args.role}"](args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    wanted = args.only.split(",")
    before = _uptime()
    print(f"load before: {before}", flush=True)
    print(f"model: examples/mlp.py MLP, d_in {args.d_in}, {args.layers} x {args.hidden}, batch {args.batch}, "
          f"{args.microbatches} microbatches, {args.schedule}, {args.steps} timed steps after {args.warmup}, "
          f"{args.rounds} rounds, 1 thread per process", flush=True)
    nprocs = {"plain": 1, "rannc1": 1, "rannc2": 2, "torchpipe2": 2}
    samples: dict[str, list[float]] = {r: [] for r in ROLES if r in wanted}
    cpu: dict[str, list[float]] = {r: [] for r in samples}
    cpu_max: dict[str, list[float]] = {r: [] for r in samples}
    losses: dict[str, float] = {}
    for rnd in range(args.rounds):
        for role in samples:
            res = _spawn(role, nprocs[role], args)
            samples[role].append(res["step_s"])
            cpu[role].append(res["cpu_s"])
            cpu_max[role].append(res["cpu_max_s"])
            losses[role] = res["loss"]
            print(f"  round {rnd + 1} {role:10s} {res['step_s'] * 1e3:8.1f} ms/step wall, CPU {res['cpu_s'] * 1e3:8.1f} ms "
                  f"(busiest rank {res['cpu_max_s'] * 1e3:.1f})", flush=True)
    med = {r: statistics.median(v) for r, v in samples.items()}
    best = {r: min(v) for r, v in samples.items()}
    cmed = {r: statistics.median(v) for r, v in cpu.items()}
    cmax = {r: statistics.median(v) for r, v in cpu_max.items()}
    figures: dict = {"load_before": before, "step_ms": {r: v * 1e3 for r, v in med.items()},
                     "best_step_ms": {r: v * 1e3 for r, v in best.items()},
                     "cpu_ms": {r: v * 1e3 for r, v in cmed.items()}, "cpu_busiest_rank_ms": {r: v * 1e3 for r, v in cmax.items()},
                     "samples_ms": {r: [x * 1e3 for x in v] for r, v in samples.items()}, "last_loss": losses}
    print("\nmedian step time (ms): " + ", ".join(f"{r} {v * 1e3:.1f}" for r, v in med.items()))
    print("best step time (ms):   " + ", ".join(f"{r} {v * 1e3:.1f}" for r, v in best.items()))
    print("CPU per step (ms, all ranks; busiest rank): " + ", ".join(f"{r} {cmed[r] * 1e3:.1f}; {cmax[r] * 1e3:.1f}"
                                                                   for r in cmed))
    if "rannc2" in med and "torchpipe2" in med:
        ratio = med["torchpipe2"] / med["rannc2"]
        figures["vs_torch_pipelining"] = ratio
        print(f"rannc 2-stage vs torch.distributed.pipelining ({args.schedule}): throughput ratio {ratio:.3f} "
              f"(target >= 1.0) {'MET' if ratio >= 1.0 else 'NOT MET'}")
    if "rannc2" in med and "plain" in med:
        speedup = med["plain"] / med["rannc2"]
        figures["speedup_vs_one_process"] = speedup
        print(f"rannc 2-stage vs one process, same model and batch: speedup {speedup:.3f} (target >= 1.7) "
              f"{'MET' if speedup >= 1.7 else 'NOT MET'}")
    if "rannc1" in med and "plain" in med:
        overhead = med["rannc1"] / med["plain"] - 1.0
        figures["overhead_1x1"] = overhead
        print(f"rannc 1 stage x 1 replica vs plain PyTorch: overhead {overhead * 100:+.1f}% (target <= 3%) "
              f"{'MET' if overhead <= 0.03 else 'NOT MET'}")
        cpu_over = cmed["rannc1"] / cmed["plain"] - 1.0
        figures["overhead_1x1_cpu"] = cpu_over
        print(f"  the same in CPU time (insensitive to other processes' load): {cpu_over * 100:+.1f}%")
    if "rannc2" in cmax and "plain" in cmed:
        bound = cmed["plain"] / cmax["rannc2"]
        figures["speedup_bound_cpu"] = bound
        figures["pipeline_work_ratio_cpu"] = cmed["rannc2"] / cmed["plain"]
        print(f"  CPU view of the pipeline: total work {cmed['rannc2'] / cmed['plain']:.3f}x one process's; one process's "
              f"CPU / busiest rank's CPU = {bound:.3f} (the speedup with a free core per rank)")
    if "torchpipe2" in cmed and "rannc2" in cmed:
        figures["vs_torch_pipelining_cpu"] = cmed["torchpipe2"] / cmed["rannc2"]
        print(f"  CPU per step, torch.distributed.pipelining / rannc: {cmed['torchpipe2'] / cmed['rannc2']:.3f}")
    if "predict" in wanted:
        pred = _prediction(args)
        figures["prediction"] = pred
        if "rannc2" in med:
            err = pred["predicted_step_s"] / med["rannc2"] - 1.0
            figures["prediction_error"] = err
            print(f"planner prediction for the 2-stage plan: {pred['predicted_step_s'] * 1e3:.1f} ms vs measured "
                  f"{med['rannc2'] * 1e3:.1f} ms: {err * 100:+.1f}% (target within 15%) "
                  f"{'MET' if abs(err) <= 0.15 else 'NOT MET'}")
        if "plain" in med:
            err1 = pred["predicted_single_s"] / med["plain"] - 1.0
            figures["prediction_error_single"] = err1
            print(f"planner prediction for one process: {pred['predicted_single_s'] * 1e3:.1f} ms vs measured "
                  f"{med['plain'] * 1e3:.1f} ms: {err1 * 100:+.1f}%")
        print("links (gloo, loopback): " + ", ".join(f"{k} {v['bandwidth'] / 1e9:.2f} GB/s {v['latency'] * 1e6:.0f} us"
                                                   for k, v in pred["links"].items() if not k.endswith("inter")))
    after = _uptime()
    figures["load_after"] = after
    print(f"load after: {after}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
