"""A real Slurm cluster on this machine: munge, slurmctld and several slurmd with fake GPUs.

    cluster = SlurmCluster.start(tmp_dir)                 # installs slurm-wlm/munge with apt if missing
    cluster.conf                                          # SLURM_CONF path; cluster.env has it exported
    cluster.run("sinfo")                                  # CompletedProcess of a client command
    cluster.nodes                                         # {"n1": NodeSpec(partition="gpu", gpu_type="a100", gpus=4), ...}
    cluster.stop()

Every slurmd runs on this host (``slurmd -N NAME``, own port, NodeAddr=127.0.0.1), so processes
of a job on different nodes rendezvous over 127.0.0.1. Fake GPUs are gres ``File=`` symlinks to
/dev/null: Slurm allocates them and sets CUDA_VISIBLE_DEVICES exactly as for real GPUs. Ports are
free ones chosen at start, so two testbeds (two test sessions) can run side by side.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from testbed.common import TestbedUnavailable, ensure_commands, free_port, sbin, wait_for

PACKAGES = {"slurmctld": "slurm-wlm", "slurmd": "slurm-wlm", "scontrol": "slurm-client", "munged": "munge"}


@dataclass(frozen=True)
class NodeSpec:
    partition: str
    gpu_type: str
    gpus: int


DEFAULT_NODES = {
    "n1": NodeSpec("gpu", "a100", 4),
    "n2": NodeSpec("gpu", "a100", 4),
    "n3": NodeSpec("small", "v100", 2),
}
DEFAULT_PARTITION = "gpu"
REAL_MEMORY_MB = 1000


def ensure_munge() -> None:
    """Start the system munged (as user munge) unless a working one already runs."""
    def works() -> bool:
        enc = subprocess.run(["munge", "-n"], capture_output=True)
        if enc.returncode != 0:
            return False
        return subprocess.run(["unmunge"], input=enc.stdout, capture_output=True).returncode == 0

    if works():
        return
    if not Path("/etc/munge/munge.key").exists():
        subprocess.run([sbin("mungekey"), "--create"], check=False, capture_output=True)
        subprocess.run(["chown", "munge:munge", "/etc/munge/munge.key"], check=False)
    subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "/run/munge"], check=True)
    proc = subprocess.run(["runuser", "-u", "munge", "--", sbin("munged")], capture_output=True, text=True)
    if proc.returncode != 0 and not works():
        raise TestbedUnavailable(f"munged did not start: {proc.stderr.strip()}")
    wait_for(works, 10, "munged")


def _hardware() -> dict[str, str]:
    """Boards/Sockets/Cores/Threads as `slurmd -C` reports them (slurmd refuses other shapes)."""
    out = subprocess.run([sbin("slurmd"), "-C"], capture_output=True, text=True).stdout
    kv = dict(re.findall(r"(\w+)=(\S+)", out.splitlines()[0] if out else ""))
    return {k: kv[k] for k in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore") if k in kv}


@dataclass
class SlurmCluster:
    base: Path
    conf: Path
    nodes: dict[str, NodeSpec]
    ctld_port: int
    env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def partitions(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, spec in self.nodes.items():
            out.setdefault(spec.partition, []).append(name)
        return out

    @classmethod
    def start(cls, base: Path, nodes: dict[str, NodeSpec] | None = None) -> "SlurmCluster":
        ensure_commands(PACKAGES)
        ensure_munge()
        nodes = dict(nodes or DEFAULT_NODES)
        base = Path(base)
        base.mkdir(parents=True, exist_ok=True)
        port = free_port(len(nodes) + 1)
        hw = _hardware()
        hw_text = " ".join(f"{k}={v}" for k, v in hw.items())
        lines = [
            "ClusterName=rannc-testbed",
            "SlurmctldHost=localhost",
            f"SlurmctldPort={port}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt", f"JobCompLoc={base}/jobcomp.txt",
            "MpiDefault=none", "MailProg=/bin/true", "ReturnToService=2", "GresTypes=gpu",
            "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0",
            "SlurmdTimeout=30", "InactiveLimit=0", "MinJobAge=60", "KillWait=5",
            # Step credentials live 10 s (default 120): a requeued job may restart after that long
            # instead of two minutes (rannc's requeue round trip test).
            "AuthInfo=cred_expire=10",
            f"StateSaveLocation={base}/state", f"SlurmdSpoolDir={base}/spool-%n",
            f"SlurmctldPidFile={base}/slurmctld.pid", f"SlurmdPidFile={base}/slurmd-%n.pid",
            f"SlurmctldLogFile={base}/slurmctld.log", f"SlurmdLogFile={base}/slurmd-%n.log",
        ]
        gres_lines = []
        for k, (name, spec) in enumerate(nodes.items(), start=1):
            lines.append(f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port + k} {hw_text} "
                         f"RealMemory={REAL_MEMORY_MB} Gres=gpu:{spec.gpu_type}:{spec.gpus} State=UNKNOWN")
            gdir = base / "gpus" / name
            gdir.mkdir(parents=True, exist_ok=True)
            for g in range(spec.gpus):
                link = gdir / f"nvidia{g}"
                if not link.is_symlink():
                    link.symlink_to("/dev/null")
            gres_lines.append(f"NodeName={name} Name=gpu Type={spec.gpu_type} File={gdir}/nvidia[0-{spec.gpus - 1}]")
            (base / f"spool-{name}").mkdir(exist_ok=True)
        parts: dict[str, list[str]] = {}
        for name, spec in nodes.items():
            parts.setdefault(spec.partition, []).append(name)
        for i, (pname, members) in enumerate(parts.items()):
            lines.append(f"PartitionName={pname} Nodes={','.join(members)} Default={'YES' if i == 0 else 'NO'} "
                         "MaxTime=INFINITE State=UP OverSubscribe=YES")
        (base / "state").mkdir(exist_ok=True)
        conf = base / "slurm.conf"
        conf.write_text("\n".join(lines) + "\n")
        (base / "gres.conf").write_text("\n".join(gres_lines) + "\n")
        env = {**os.environ, "SLURM_CONF": str(conf)}
        for var in [v for v in env if v.startswith(("SLURM_JOB", "SLURM_STEP", "SLURM_NODELIST"))]:
            env.pop(var)
        cluster = cls(base=base, conf=conf, nodes=nodes, ctld_port=port, env=env)
        try:
            cluster._daemon([sbin("slurmctld"), "-D", "-c", "-f", str(conf)], "slurmctld")
            for name in nodes:
                cluster._daemon([sbin("slurmd"), "-D", "-N", name, "-f", str(conf)], f"slurmd-{name}")
            wait_for(cluster._all_idle, 30, "slurm nodes idle", interval=0.3)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _daemon(self, argv: list[str], what: str) -> None:
        """Start a daemon in the foreground as our child, so stop() can end and reap it."""
        out = open(self.base / f"{what}.out", "w")
        proc = subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        time.sleep(0.1)
        if proc.poll() is not None:
            raise TestbedUnavailable(f"{what} exited at start: {(self.base / f'{what}.out').read_text()[-300:]}")

    def _all_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t").stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return all(states.get(n) == "idle" for n in self.nodes)

    def run(self, *argv: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=timeout, check=check)

    def stop(self) -> None:
        """Stop this testbed's daemons (our child processes); munged stays (a shared system service)."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def logs(self) -> str:
        """Tail of every daemon log, for failure messages."""
        files = sorted([*self.base.glob("*.log"), *self.base.glob("*.out")])
        return "\n".join(f"--- {p.name}\n" + p.read_text()[-1500:] for p in files)


def slurm_available() -> bool:
    return all(shutil.which(c) or shutil.which(c, path="/usr/sbin") for c in PACKAGES)
