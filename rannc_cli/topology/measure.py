"""`rannc topology --measure`: time p2p and all-reduce within and between nodes, store them.

    result = measure(topo)                   # srun job over 2 nodes (Slurm) or local processes
    topo.links["inter_node"]                 # Link(bandwidth=..., latency=..., source="measured")

The job runs ``python -m rannc_cli.topology.measure_worker`` with this interpreter (same venv,
same torch) in every rank: NCCL on GPUs, gloo on CPU. Under Slurm it goes through
``srun --kill-on-bad-exit=1`` (inside an allocation it uses it; outside, srun allocates); locally
it starts the processes itself and rendezvous on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Any

from rannc_cli.errors import RanncError
from rannc_cli.topology.format import Link, Topology
from rannc_cli.topology.measure_worker import MARKER

DEFAULT_BYTES = 8 << 20
DEFAULT_ITERS = 5


def _worker_argv(nbytes: int, iters: int) -> list[str]:
    return [sys.executable, "-m", "rannc_cli.topology.measure_worker", "--bytes", str(nbytes), "--iters", str(iters)]


def _parse(stdout: str, stderr: str, how: str) -> dict[str, Any]:
    for line in stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    tail = " | ".join((stderr or stdout).strip().splitlines()[-3:])
    raise RanncError(f"the measurement job ({how}) printed no result: {tail or 'no output'}",
                     hint="run it again; if it hangs or fails, check that the nodes reach each other (MASTER_ADDR, "
                          "GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local(procs: int, nbytes: int = DEFAULT_BYTES, iters: int = DEFAULT_ITERS, timeout: float = 300) -> dict[str, Any]:
    """``procs`` ranks on this machine (one node)."""
    port = _free_port()
    children = []
    for r in range(procs):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(procs), "LOCAL_RANK": str(r), "NODE_RANK": "0",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        for var in [v for v in env if v.startswith("SLURM_")]:
            env.pop(var)
        children.append(subprocess.Popen(_worker_argv(nbytes, iters), env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for child in children:
            outs.append(child.communicate(timeout=timeout))
    except subprocess.TimeoutExpired:
        for child in children:
            child.kill()
        raise RanncError(f"local measurement did not finish in {timeout:.0f} s") from None
    failed = [(c.returncode, o) for c, o in zip(children, outs) if c.returncode != 0]
    if failed:
        rc, (out, err) = failed[0]
        raise RanncError(f"local measurement rank failed (exit {rc}): {' | '.join(err.strip().splitlines()[-2:])}")
    return _parse(outs[0][0], outs[0][1], "local")


def slurm_argv(nodes: int, procs: int, gpus: int, partition: str | None, nbytes: int, iters: int) -> list[str]:
    """The srun command line of the measurement job."""
    argv = ["srun", "--kill-on-bad-exit=1", f"--nodes={nodes}", f"--ntasks-per-node={procs}", "--time=10",
            "--job-name=rannc-measure"]
    if partition:
        argv.append(f"--partition={partition}")
    if gpus:
        argv.append(f"--gpus-per-node={gpus}")
    return argv + _worker_argv(nbytes, iters)


def run_slurm(nodes: int, procs: int, gpus: int, partition: str | None, nbytes: int = DEFAULT_BYTES,
              iters: int = DEFAULT_ITERS, timeout: float = 900) -> dict[str, Any]:
    argv = slurm_argv(nodes, procs, gpus, partition, nbytes, iters)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise RanncError(f"the srun measurement job did not finish in {timeout:.0f} s",
                         hint="the partition may be busy; try again or pass --partition") from None
    except FileNotFoundError:
        raise RanncError("srun not found on this machine", hint="run on a Slurm login node or pass --scheduler local") from None
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise RanncError(f"the srun measurement job failed (exit {proc.returncode}): {tail}")
    return _parse(proc.stdout, proc.stderr, "srun")


def measure(topo: Topology, partition: str | None = None, procs: int | None = None,
            nbytes: int = DEFAULT_BYTES, iters: int = DEFAULT_ITERS) -> dict[str, Any]:
    """Run the job fitting ``topo`` (2 nodes when it has 2 usable, else 1) and store measured links in it."""
    if topo.discovery.get("host", "local") != "local":
        raise RanncError("--measure runs jobs from the machine rannc runs on, not over --host",
                         hint="log in to the cluster and run `rannc topology --measure` there")
    usable = [n for n in topo.nodes if n.get("available", True)]
    gpus = min((int(n["gpus"]) for n in usable), default=0)
    per_node = procs or (gpus if gpus else 2)
    if topo.scheduler == "slurm":
        in_job = topo.allocation is not None
        count = min(2, len(usable))
        if count == 0:
            raise RanncError("no available node to measure on", hint="every node is down or drained")
        result = run_slurm(count, per_node, 0 if in_job else min(gpus, per_node), None if in_job else partition,
                           nbytes, iters)
        result["how"] = "srun"
    elif topo.scheduler == "local" or topo.discovery.get("method") == "local":
        result = run_local(per_node, nbytes, iters)
        result["how"] = "local"
    else:
        raise RanncError(f"--measure through {topo.scheduler} is not supported yet",
                         hint="inside a job on the cluster, run `rannc topology --scheduler local --measure` to measure one node")
    apply_measurement(topo, result)
    return result


def apply_measurement(topo: Topology, result: dict[str, Any]) -> None:
    """Measured links replace whatever the topology had for those kinds."""
    for kind in ("intra_node", "inter_node", "allreduce_intra", "allreduce_inter"):
        if kind in result:
            r = result[kind]
            topo.links[kind] = Link(bandwidth=float(r["bandwidth"]), latency=float(r["latency"]), source="measured")
    topo.measurement = {k: v for k, v in result.items() if k not in topo.links} | {
        "raw": {k: result[k] for k in topo.links if k in result}}
