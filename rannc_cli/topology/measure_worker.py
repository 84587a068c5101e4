"""One rank of the link measurement job (started by srun or by measure.run_local).

    srun --kill-on-bad-exit=1 -N 2 --ntasks-per-node=2 python -m rannc_cli.topology.measure_worker --bytes 8388608

Rank, world size and node come from SLURM_* (or RANK/WORLD_SIZE/NODE_RANK when started locally);
the rendezvous address is MASTER_ADDR, else the first node of the job (its address from DNS, else
Slurm's NodeAddr). Backend: NCCL when this rank sees a GPU, else gloo. Rank 0 prints one line
``RANNC-MEASURE {json}`` with one-way p2p times (intra- and inter-node) and all-reduce times.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import time

MARKER = "RANNC-MEASURE "


def _env_int(*names: str, default: int | None = None) -> int:
    for name in names:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    if default is None:
        raise SystemExit(f"rannc measure: none of {', '.join(names)} is set; start through srun or rannc topology --measure")
    return default


def _master_addr() -> str:
    if os.environ.get("MASTER_ADDR"):
        return os.environ["MASTER_ADDR"]
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    from rannc_cli.topology.hostlist import expand

    first = expand(nodelist)[0]
    try:
        return socket.gethostbyname(first)
    except OSError:   # node names that do not resolve: ask Slurm where the node is
        out = subprocess.run(["scontrol", "show", "node", "-o", first], capture_output=True, text=True).stdout
        for item in out.split():
            if item.startswith("NodeAddr="):
                return item.split("=", 1)[1]
        raise SystemExit(f"rannc measure: cannot resolve the first node {first!r}; set MASTER_ADDR")


def _master_port() -> int:
    if os.environ.get("MASTER_PORT", "").isdigit():
        return int(os.environ["MASTER_PORT"])
    return 20000 + _env_int("SLURM_JOB_ID", default=0) % 20000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rannc-measure-worker")
    ap.add_argument("--bytes", type=int, default=8 << 20, help="message size for bandwidth")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    args = ap.parse_args(argv)

    import torch
    import torch.distributed as dist

    rank = _env_int("SLURM_PROCID", "RANK")
    world = _env_int("SLURM_NTASKS", "WORLD_SIZE")
    local_rank = _env_int("SLURM_LOCALID", "LOCAL_RANK", default=0)
    node_id = _env_int("SLURM_NODEID", "NODE_RANK", default=0)
    use_cuda = args.backend == "nccl" or (args.backend == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    device = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1)) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://{_master_addr()}:{_master_port()}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    nodes_of = [None] * world
    dist.all_gather_object(nodes_of, node_id)
    node_ranks: dict[int, list[int]] = {}
    for r, n in enumerate(nodes_of):
        node_ranks.setdefault(n, []).append(r)
    node0 = nodes_of[0]
    # every rank creates every group, in the same order
    groups = {n: dist.new_group(rs) for n, rs in sorted(node_ranks.items())}
    sync = (lambda: torch.cuda.synchronize(device)) if use_cuda else (lambda: None)

    def pingpong(peer: int, nbytes: int) -> float | None:
        """One-way seconds between rank 0 and ``peer`` (median of iters round trips / 2)."""
        if rank not in (0, peer):
            return None
        buf = torch.zeros(max(nbytes // 4, 1), dtype=torch.float32, device=device)
        times = []
        for i in range(args.iters + 2):
            sync()
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(buf, peer)
                dist.recv(buf, peer)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            sync()
            if i >= 2:
                times.append((time.perf_counter() - t0) / 2)
        return sorted(times)[len(times) // 2]

    def allreduce(group, members: list[int], nbytes: int) -> float | None:
        if rank not in members:
            return None
        buf = torch.ones(max(nbytes // 4, 1), dtype=torch.float32, device=device)
        times = []
        for i in range(args.iters + 2):
            sync()
            dist.barrier(group=group)
            t0 = time.perf_counter()
            dist.all_reduce(buf, group=group)
            sync()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    result: dict[str, object] = {"backend": backend, "world": world, "nodes": len(node_ranks),
                                 "processes_per_node": len(node_ranks[node0]), "message_bytes": args.bytes,
                                 "iterations": args.iters, "torch": torch.__version__}
    intra_peer = next((r for r in node_ranks[node0] if r != 0), None)
    inter_peer = next((rs[0] for n, rs in sorted(node_ranks.items()) if n != node0), None)
    for name, peer in (("intra_node", intra_peer), ("inter_node", inter_peer)):
        if peer is not None:
            lat, big = pingpong(peer, 4), pingpong(peer, args.bytes)
            dist.barrier()
            if rank == 0:
                result[name] = {"latency": lat, "seconds": big, "bandwidth": args.bytes / big}
    for name, group, members in (("allreduce_intra", groups[node0], node_ranks[node0]),
                                 ("allreduce_inter", None, list(range(world)))):
        n = len(members)
        if n < 2 or (name == "allreduce_inter" and len(node_ranks) < 2):
            continue
        lat, big = allreduce(group, members, 4), allreduce(group, members, args.bytes)
        dist.barrier()
        if rank == 0:
            result[name] = {"latency": lat, "seconds": big, "ranks": n,
                            "bandwidth": args.bytes / big * 2 * (n - 1) / n}   # bus bandwidth
    if rank == 0:
        print(MARKER + json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
