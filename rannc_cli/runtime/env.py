"""Where this process sits in the job: rank, world size, local rank, rendezvous address.

    env = detect_env()                # from torchrun, `rannc run`, Slurm, or PBS/mpiexec variables
    if env is not None and env.world_size > 1:
        init_distributed(env)         # gloo on CPU, NCCL on GPUs, timeout from settings

Sources, first match wins:
- torchrun / `rannc run`: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
- Slurm (srun): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_STEP_NODELIST/SLURM_JOB_NODELIST
  (first host is the master), port from the job id unless MASTER_PORT is set.
- PBS with mpiexec (Open MPI, MPICH/PMI, PALS): OMPI_COMM_WORLD_RANK / PMI_RANK / PMIX_RANK /
  PALS_RANKID and their SIZE/LOCAL_RANK siblings; the master is the first line of PBS_NODEFILE.
The network interface is chosen by torch itself from GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME.
"""

from __future__ import annotations

import datetime
import os
import zlib
from dataclasses import dataclass
from typing import Mapping

from rannc_cli.errors import RanncError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # 'torchrun', 'slurm', 'pbs'

    @property
    def nodes(self) -> int:
        return max(1, -(-self.world_size // max(1, self.local_world_size)))


def _int(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        if env.get(name, "").strip():
            try:
                return int(env[name].split("(")[0].split(",")[0])
            except ValueError:
                raise RanncError(f"environment variable {name}={env[name]!r} is not an integer") from None
    return None


def _port_from(text: str) -> int:
    return 20000 + zlib.crc32(text.encode()) % 20000


def detect_env(env: Mapping[str, str] | None = None) -> DistEnv | None:
    """The job's distributed layout, or None when this process runs alone."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE") or 1
        local_world = _int(env, "LOCAL_WORLD_SIZE") or world
        return DistEnv(_int(env, "RANK") or 0, world, _int(env, "LOCAL_RANK") or 0, local_world,
                       env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT") or 29500, "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        from rannc_cli.topology.hostlist import expand

        world = _int(env, "SLURM_NTASKS") or 1
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        hosts = expand(nodelist)
        local_world = _int(env, "SLURM_NTASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") \
            or -(-world // max(1, len(hosts)))
        port = _int(env, "MASTER_PORT") or _port_from(env.get("SLURM_JOB_ID", "0") + env.get("SLURM_STEP_ID", ""))
        return DistEnv(_int(env, "SLURM_PROCID") or 0, world, _int(env, "SLURM_LOCALID") or 0, local_world,
                       env.get("MASTER_ADDR") or hosts[0], port, "slurm")
    rank = _int(env, "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "PALS_RANKID")
    size = _int(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PALS_SIZE", "MPI_WORLD_SIZE")
    if rank is not None and size is not None:
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PALS_LOCAL_RANKID", "PMI_LOCAL_RANK") or 0
        local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PALS_LOCAL_SIZE",
                           "PMI_LOCAL_SIZE") or size
        master = env.get("MASTER_ADDR", "")
        nodefile = env.get("PBS_NODEFILE", "")
        if not master and nodefile:
            try:
                with open(nodefile) as fh:
                    master = next((line.strip() for line in fh if line.strip()), "")
            except OSError as exc:
                raise RanncError(f"cannot read PBS_NODEFILE {nodefile} ({exc.strerror})") from None
        port = _int(env, "MASTER_PORT") or _port_from(env.get("PBS_JOBID", "0"))
        return DistEnv(rank, size, local, local_world, master or "127.0.0.1", port, "pbs")
    return None


def device_for(env: DistEnv) -> "torch.device":  # noqa: F821
    """This rank's device: its local GPU (LOCAL_RANK among CUDA_VISIBLE_DEVICES), else the CPU."""
    import torch

    from rannc_cli.config import settings

    wanted = str(settings.get("runtime_device"))
    if wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RanncError("RANNC_RUNTIME_DEVICE=cuda but no CUDA device is visible", hint="unset it to run on the CPU")
    count = torch.cuda.device_count()
    return torch.device("cuda", 0 if count == 1 else env.local_rank % count)


def init_distributed(env: DistEnv, device: "torch.device") -> None:  # noqa: F821
    """Join the default process group (NCCL on GPUs, gloo on the CPU) with the settings' timeout."""
    import torch.distributed as dist

    from rannc_cli.config import settings

    if dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=float(settings.get("runtime_timeout")))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        import torch

        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, init_method=f"tcp://{env.master_addr}:{env.master_port}",
                                rank=env.rank, world_size=env.world_size, timeout=timeout)
    except Exception as exc:  # noqa: BLE001
        raise RanncError(f"rank {env.rank} could not join the job at {env.master_addr}:{env.master_port} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})",
                         hint="check MASTER_ADDR/MASTER_PORT, or choose the interface with GLOO_SOCKET_IFNAME / "
                              "NCCL_SOCKET_IFNAME", cause=exc) from None
