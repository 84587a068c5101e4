"""Schedule benchmark (issue 14): rannc's 1F1B, interleaved 1F1B and ZB-H1 against torch.distributed.pipelining.

    python benchmarks/schedule_bench.py                  # 2 ranks, 8-layer Transformer-ish model, 8 microbatches
    python benchmarks/schedule_bench.py --rounds 5 --json out.json --only rannc_zb,torch_zb

One split of a small Transformer-ish model (pre-norm blocks: single-head attention + GELU MLP,
residuals; a linear head and cross entropy), cut at layer boundaries, trained with SGD on CPU gloo,
one thread per process. Pairs on the same stage split and the same microbatches:
- rannc 1f1b (2 stages, 1 per rank) vs torch Schedule1F1B;
- rannc interleaved, v = 2 (4 stages, stages r and r + 2 on rank r) vs torch ScheduleInterleaved1F1B
  with the same two stages per rank;
- rannc zb (ZB-H1, 2 stages) vs torch ScheduleInterleavedZeroBubble with one stage per rank (its
  ZB1P order, the zero-bubble schedule that fits a one-chunk split; ScheduleZBVZeroBubble needs the
  V placement of two chunks per rank, which is another split).
Each figure is the median over ``--rounds`` rounds (configurations take turns) of the mean step
time of the timed steps after ``--warmup``; a step is forward + backward + optimizer step. Ratios
are torch / rannc step time (target >= 1.0: rannc no slower). The CPU time per step (sum over ranks)
is printed too: other processes' load does not inflate it. With ``predict`` in ``--only`` the step
rannc_cli.planner.simulate predicts for each rannc plan (profile measured here, gloo loopback
links measured) is printed beside the measured one (target within 15%), or "n/a" where the
simulator cannot price that schedule, and so is the compute it predicts per step summed over the
ranks beside the measured CPU time of all ranks (what other processes' load inflates least).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAIRS = (("rannc_1f1b", "torch_1f1b"), ("rannc_interleaved", "torch_interleaved"), ("rannc_zb", "torch_zb"))
ROLES = tuple(r for pair in PAIRS for r in pair)


# ---------------------------------------------------------------------------- model and data
def _classes():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d: int, hidden: int):
            super().__init__()
            self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)

        def forward(self, x):
            q, k, v = self.qkv(self.n1(x)).chunk(3, dim=-1)
            att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
            x = x + self.proj(att @ v)
            return x + self.down(F.gelu(self.up(self.n2(x))))

    class Logits(nn.Module):
        def __init__(self, d: int, hidden: int, layers: int, classes: int):
            super().__init__()
            self.layers = nn.Sequential(*[Block(d, hidden) for _ in range(layers)])
            self.head = nn.Linear(d, classes)

        def forward(self, x):
            return self.head(self.layers(x)).mean(dim=1)

    class WithLoss(nn.Module):
        def __init__(self, logits: nn.Module):
            super().__init__()
            self.logits = logits

        def forward(self, x, y):
            return F.cross_entropy(self.logits(x), y)

    return Logits, WithLoss


def _logits(args):
    import torch

    Logits, _ = _classes()
    torch.manual_seed(0)
    return Logits(args.d, args.hidden, args.layers, 10)


def _batch(args):
    import torch

    gen = torch.Generator().manual_seed(1)
    return torch.randn(args.batch, args.seq, args.d, generator=gen), torch.randint(0, 10, (args.batch,), generator=gen)


def _cuts(args, stages: int) -> list[int]:
    """Layer indices where stages 1..S-1 begin (equal layer counts)."""
    return [round(i * args.layers / stages) for i in range(1, stages)]


def _one_thread(pin: bool) -> None:
    import torch

    if pin and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[int(os.environ["RANK"]) % len(cpus)]})  # rank r on its own core
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


def _timed(step, args) -> dict:
    for _ in range(args.warmup):
        step()
    times = []
    c0 = time.process_time()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    cpu = (time.process_time() - c0) / args.steps
    return {"step_s": statistics.mean(times), "cpu_s": cpu, "loss": float(loss)}


# ---------------------------------------------------------------------------- rannc roles
def _block_bounds(model, x, y, layer_cuts: list[int]) -> list[int]:
    """rannc block index where each layer of ``layer_cuts`` begins (the same cut as torch's split)."""
    from rannc_cli.graph.blocks import build_blocks
    from rannc_cli.graph.capture import capture

    bg = build_blocks(capture(model, (x, y), {}))
    names = [b.name or "" for b in bg.blocks]
    out = []
    for layer in layer_cuts:
        prefix = f"logits.layers.{layer}"
        out.append(next(i for i, n in enumerate(names) if n == prefix or n.startswith(prefix + ".")))
    return out


def _rannc(args, schedule: str, virtual: int) -> dict:
    import torch

    from rannc_cli import RaNNCModule

    _, WithLoss = _classes()
    model = WithLoss(_logits(args))
    x, y = _batch(args)
    world = int(os.environ["WORLD_SIZE"])
    bounds = _block_bounds(model, x[: args.batch // args.microbatches], y[: args.batch // args.microbatches],
                           _cuts(args, world * virtual))
    plan = {"replicas": [1] * world, "microbatches": args.microbatches, "schedule": schedule,
            "virtual_stages": virtual, "bounds": bounds}
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    wrapped = RaNNCModule(model, opt, plan=plan, quiet=True)

    def step():
        loss = wrapped(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    out = _timed(step, args)
    out["bounds"] = bounds
    return out


def role_rannc_1f1b(args) -> dict:
    return _rannc(args, "1f1b", 1)


def role_rannc_interleaved(args) -> dict:
    return _rannc(args, "interleaved", 2)


def role_rannc_zb(args) -> dict:
    return _rannc(args, "zb", 1)


# ---------------------------------------------------------------------------- torch.distributed.pipelining roles
def _torch(args, kind: str, virtual: int) -> dict:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed import pipelining as pp

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    logits = _logits(args)
    x, y = _batch(args)
    mb = args.batch // args.microbatches
    split = {f"layers.{c}": pp.SplitPoint.BEGINNING for c in _cuts(args, world * virtual)}
    pipe = pp.pipeline(logits, mb_args=(x[:mb],), split_spec=split)
    mine = [pipe.build_stage(rank + c * world, torch.device("cpu")) for c in range(virtual)]

    def loss_fn(out, target):
        return F.cross_entropy(out, target) / args.microbatches  # the batch mean, as rannc's loss

    common = {"n_microbatches": args.microbatches, "loss_fn": loss_fn, "scale_grads": False}
    if kind == "1f1b":
        schedule = pp.Schedule1F1B(mine[0], **common)
    elif kind == "interleaved":
        schedule = pp.ScheduleInterleaved1F1B(mine, **common)
    else:
        schedule = pp.ScheduleInterleavedZeroBubble(mine, **common)
    params = [p for st in mine for p in st.submod.parameters()]
    opt = torch.optim.SGD(params, lr=1e-3)
    first = any(st.is_first for st in mine)
    last = any(st.is_last for st in mine)

    def step():
        losses: list = []
        kwargs = {"target": y, "losses": losses} if last else {}
        if first:
            schedule.step(x, **kwargs)
        else:
            schedule.step(**kwargs)
        opt.step()
        opt.zero_grad()
        return sum(float(v) for v in losses) if last else 0.0

    out = _timed(step, args)
    dist.destroy_process_group()
    return out


def role_torch_1f1b(args) -> dict:
    return _torch(args, "1f1b", 1)


def role_torch_interleaved(args) -> dict:
    return _torch(args, "interleaved", 2)


def role_torch_zb(args) -> dict:
    return _torch(args, "zb", 1)


# ---------------------------------------------------------------------------- orchestration
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(role: str, args) -> dict:
    port = str(_free_port())
    procs = []
    for rank in range(args.nproc):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "PYTHONUNBUFFERED": "1", "RANK": str(rank), "WORLD_SIZE": str(args.nproc),
               "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(args.nproc)}
        argv = [sys.executable, __file__, "--role", role, *args.passthrough]
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        if p.returncode != 0:
            raise SystemExit(f"schedule_bench: role {role} failed (exit {p.returncode}): {err.strip()[-2000:]}")
        line = next(l for l in out.splitlines() if l.startswith("RESULT "))
        results.append(json.loads(line[len("RESULT "):]))
    return {"step_s": max(r["step_s"] for r in results), "cpu_s": sum(r["cpu_s"] for r in results),
            "loss": next((r["loss"] for r in results if r["loss"]), 0.0), "bounds": results[0].get("bounds")}


def _predictions(args, bounds: dict[str, list[int]]) -> tuple[dict[str, float | None], dict[str, float]]:
    """Simulated step of each rannc plan (None where the simulator cannot price its schedule), and
    the compute it predicts per step summed over the ranks (``Simulation.busy`` of each group),
    which compares with the measured CPU time of all ranks also on a loaded machine."""
    _one_thread(False)
    from rannc_cli.planner.cluster import ClusterSpec, Link
    from rannc_cli.planner.costmodel import CostModel
    from rannc_cli.planner.simulate import simulate
    from rannc_cli.profiler.build import profile_model
    from rannc_cli.runtime.planning import even_plan
    from rannc_cli.topology import measure

    links = measure.run_local(2, nbytes=4 << 20, iters=5)
    kinds = {k: Link(float(links[k]["bandwidth"]), float(links[k]["latency"]), "measured")
             for k in ("intra_node", "allreduce_intra")}
    kinds["inter_node"], kinds["allreduce_inter"] = kinds["intra_node"], kinds["allreduce_intra"]
    cluster = ClusterSpec(1, args.nproc, 8 << 30, kinds, "cpu", "bench")
    _, WithLoss = _classes()
    x, y = _batch(args)
    os.environ.setdefault("RANNC_PROFILE_REPEATS", "5")
    profile, _ = profile_model(WithLoss(_logits(args)), (x, y), {}, mode="measured", use_cache=False,
                               microbatch_sizes=[args.batch // args.microbatches, args.batch])
    out: dict[str, float | None] = {}
    busy: dict[str, float] = {}
    for role, schedule, virtual in (("rannc_1f1b", "1f1b", 1), ("rannc_interleaved", "interleaved", 2),
                                    ("rannc_zb", "zb", 1)):
        if role not in bounds:
            continue
        try:
            plan = even_plan(len(profile.blocks), [1] * args.nproc, args.microbatches, args.batch, schedule,
                             bounds=bounds[role], gpus_per_node=args.nproc, virtual=virtual)
            sim = simulate(plan, CostModel(profile, cluster, args.batch))
            out[role] = float(sim.step_seconds if hasattr(sim, "step_seconds") else sim[0])
            busy[role] = float(sum(sim.busy[:plan.groups]))
        except Exception:  # noqa: BLE001 - a schedule the simulator does not know yet
            out[role] = None
    return out, busy


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "uptime unavailable"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=ROLES)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default=",".join(ROLES) + ",predict", help="comma list of roles (and 'predict')")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="let the OS place the ranks (default: rank r pinned to core r, so two ranks never share "
                             "a core while the other idles, which made wall times bimodal)")
    args = parser.parse_args()
    args.passthrough = [f"--nproc={args.nproc}", f"--d={args.d}", f"--hidden={args.hidden}", f"--seq={args.seq}",
                        f"--layers={args.layers}", f"--batch={args.batch}", f"--microbatches={args.microbatches}",
                        f"--steps={args.steps}", f"--warmup={args.warmup}", *([] if args.pin else ["--no-pin"])]
    if args.role:
        _one_thread(args.pin)
        print("RESULT " + json.dumps(globals()[f"role_{args.role}"](args)), flush=True)
        return
    wanted = args.only.split(",")
    before = _uptime()
    print(f"load before: {before}", flush=True)
    print(f"model: {args.layers} pre-norm blocks d {args.d}, MLP {args.hidden}, seq {args.seq}, batch {args.batch}, "
          f"{args.microbatches} microbatches, {args.nproc} ranks, {args.steps} timed steps after {args.warmup}, "
          f"{args.rounds} rounds, 1 thread per process{', rank r pinned to core r' if args.pin else ''}", flush=True)
    samples: dict[str, list[float]] = {r: [] for r in ROLES if r in wanted}
    cpu: dict[str, list[float]] = {r: [] for r in samples}
    bounds: dict[str, list[int]] = {}
    for rnd in range(args.rounds):
        for role in samples:
            res = _spawn(role, args)
            samples[role].append(res["step_s"])
            cpu[role].append(res["cpu_s"])
            if res.get("bounds"):
                bounds[role] = res["bounds"]
            print(f"  round {rnd + 1} {role:18s} {res['step_s'] * 1e3:8.1f} ms/step, CPU {res['cpu_s'] * 1e3:8.1f} ms "
                  f"(loss {res['loss']:.4f})", flush=True)
    med = {r: statistics.median(v) for r, v in samples.items()}
    cmed = {r: statistics.median(v) for r, v in cpu.items()}
    figures: dict = {"load_before": before, "step_ms": {r: v * 1e3 for r, v in med.items()},
                     "cpu_ms": {r: v * 1e3 for r, v in cmed.items()},
                     "samples_ms": {r: [x * 1e3 for x in v] for r, v in samples.items()}}
    print("\nmedian step (ms): " + ", ".join(f"{r} {v * 1e3:.1f}" for r, v in med.items()))
    print("median CPU per step, all ranks (ms): " + ", ".join(f"{r} {v * 1e3:.1f}" for r, v in cmed.items()))
    for ours, theirs in PAIRS:
        if ours in med and theirs in med:
            ratio, cratio = med[theirs] / med[ours], cmed[theirs] / cmed[ours]
            figures[f"{ours}_vs_{theirs}"] = ratio
            print(f"{ours} vs {theirs}: throughput ratio {ratio:.3f} (target >= 1.0) {'MET' if ratio >= 1.0 else 'NOT MET'}; "
                  f"CPU ratio {cratio:.3f}")
    if "predict" in wanted:
        pred, busy = _predictions(args, bounds)
        figures["predicted_ms"] = {r: (v * 1e3 if v is not None else None) for r, v in pred.items()}
        figures["predicted_cpu_ms"] = {r: v * 1e3 for r, v in busy.items()}
        for role, value in busy.items():
            if role in cmed:
                print(f"predicted compute for {role}, all ranks: {value * 1e3:.1f} ms vs measured CPU "
                      f"{cmed[role] * 1e3:.1f} ms: {(value / cmed[role] - 1.0) * 100:+.1f}% (load-insensitive check)")
        for role, value in pred.items():
            if value is None or role not in med:
                print(f"predicted step for {role}: n/a (the simulator does not price this schedule yet)")
                continue
            err = value / med[role] - 1.0
            print(f"predicted step for {role}: {value * 1e3:.1f} ms vs measured {med[role] * 1e3:.1f} ms: "
                  f"{err * 100:+.1f}% (target within 15%) {'MET' if abs(err) <= 0.15 else 'NOT MET'}")
    after = _uptime()
    figures["load_after"] = after
    print(f"load after: {after}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
