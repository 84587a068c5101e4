"""A real Grid Engine (Son of Grid Engine 8.1.9, Debian's gridengine packages) on this machine.

    cluster = GridEngine.start(tmp_dir)        # fetches the packages with apt when missing
    cluster.env                                # SGE_ROOT, SGE_CELL, ports, PATH with qsub/qstat/qconf first
    cluster.run("qstat", "-f")                 # CompletedProcess of a client command
    cluster.host, cluster.gpus, cluster.slots  # the one execution host and what it offers
    cluster.stop()

One cell of its own per test session: its own SGE_ROOT and spool under ``base``, free ports,
sge_qmaster and sge_execd as our children in the foreground (``SGE_ND``), so two sessions can
run side by side and nothing of the system's configuration is touched. Queue ``all.q`` (``slots``
slots on this host) with parallel environments ``smp`` ($pe_slots) and ``mpi`` ($fill_up), and a
fake GPU complex ``gpu`` (a JOB consumable, ``gpus`` per host): Grid Engine books it like real
GPUs, nothing is attached to it.

Packages: Debian's gridengine-client conflicts with slurm-wlm-torque (both ship /usr/bin/qsub),
which the Slurm testbed's PBS wrappers need. So the four packages are not installed: their .deb
files are fetched with ``apt-get download`` and unpacked into a cache folder
(``RANNC_TESTBED_CACHE``, default /var/cache/rannc-testbed), the commands are reached through
PATH, and /usr/lib/gridengine, where the binaries look for their spooling libraries (a path
compiled in), becomes a link to the unpacked folder. A system install of the packages is used as
it is. Facts and pitfalls: tests/testbed/README.md.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from testbed.common import TestbedUnavailable, free_port, wait_for

PACKAGES = ("gridengine-common", "gridengine-client", "gridengine-master", "gridengine-exec")
LIBRARIES = ("libjemalloc2", "libhwloc15", "libmunge2", "libtirpc3", "libdb5.3", "libssl3")
SYSTEM_BIN = Path("/usr/lib/gridengine")     # compiled into the binaries (spooling libraries)
CELL = "default"


def _cache() -> Path:
    return Path(os.environ.get("RANNC_TESTBED_CACHE") or "/var/cache/rannc-testbed") / "gridengine"


def _apt(*argv: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", *argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def _missing_libraries(binaries: list[Path]) -> bool:
    for binary in binaries:
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
        if "not found" in out:
            return True
    return False


def ensure_binaries() -> Path:
    """The folder with sge_qmaster, sge_execd, qsub, ... (/usr/lib/gridengine); unpack the packages when absent."""
    if (SYSTEM_BIN / "sge_qmaster").is_file():
        root = SYSTEM_BIN
    else:
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise TestbedUnavailable("Grid Engine is not installed and there is no root apt-get to fetch it")
        unpacked = _cache() / "root"
        if not (unpacked / "usr/lib/gridengine/sge_qmaster").is_file():
            _unpack(unpacked)
        if SYSTEM_BIN.is_symlink() or not SYSTEM_BIN.exists():
            if SYSTEM_BIN.is_symlink():
                SYSTEM_BIN.unlink()
            SYSTEM_BIN.symlink_to(unpacked / "usr/lib/gridengine")
        root = SYSTEM_BIN
    needed = [root / "sge_qmaster", root / "sge_execd", root / "qsub"]
    if _missing_libraries(needed):
        res = _apt("install", "-y", "-qq", "--no-install-recommends", *LIBRARIES)
        if res.returncode != 0 or _missing_libraries(needed):
            raise TestbedUnavailable(f"Grid Engine's libraries are missing: {res.stderr.strip()[-300:]}")
    return root


def _unpack(target: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        res = _apt("download", *PACKAGES, cwd=tmp)
        if res.returncode != 0:
            _apt("update", "-qq")
            res = _apt("download", *PACKAGES, cwd=tmp)
        if res.returncode != 0:
            raise TestbedUnavailable(f"apt-get download {' '.join(PACKAGES)} failed: {res.stderr.strip()[-300:]}")
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for deb in sorted(Path(tmp).glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(partial)], check=True, capture_output=True)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)


def host_names() -> tuple[str, list[str]]:
    """This host's name and the other names it resolves as (Grid Engine's host_aliases): the reverse
    lookup of 127.0.0.1-style addresses says ``localhost`` while gethostname() says ``vm``."""
    host = socket.gethostname()
    try:
        addr = socket.gethostbyname(host)
    except OSError as exc:
        raise TestbedUnavailable(f"this host's name {host!r} does not resolve ({exc}); Grid Engine needs it") from None
    aliases: list[str] = []
    try:
        aliases.append(socket.gethostbyaddr(addr)[0])
    except OSError:
        pass
    aliases.append("localhost")
    return host, [a for i, a in enumerate(aliases) if a != host and a not in aliases[:i]]


def _bootstrap(common: Path, spool: Path, binaries: Path) -> str:
    return "\n".join([
        "admin_user              root", "default_domain          none", "ignore_fqdn             true",
        "spooling_method         classic", "spooling_lib            libspoolc",
        f"spooling_params         {common};{spool / 'qmaster'}", f"binary_path             {binaries}",
        f"qmaster_spool_dir       {spool / 'qmaster'}", "security_mode           none",
        "listener_threads        2", "worker_threads          2", "scheduler_threads       1", ""])


def _global_config(default: str, spool: Path) -> str:
    """Debian's default global configuration with root jobs allowed, fast load reports and prompt accounting."""
    edits = {"execd_spool_dir": str(spool / "execd"), "min_uid": "0", "min_gid": "0", "load_report_time": "00:00:05",
             "reporting_params": "accounting=true reporting=false flush_time=00:00:15 joblog=false "
                                 "sharelog=00:00:00 accounting_flush_time=00:00:00",
             "mailer": "/bin/true", "max_unheard": "00:01:00"}
    out = []
    for line in default.splitlines():
        key = line.split()[0] if line.strip() and not line.startswith("#") else None
        out.append(f"{key:<22} {edits[key]}" if key in edits else line)
    return "\n".join(out) + "\n"


def _pe(name: str, rule: str) -> str:
    return "\n".join([f"pe_name            {name}", "slots              999", "user_lists         NONE",
                      "xuser_lists        NONE", "start_proc_args    NONE", "stop_proc_args     NONE",
                      f"allocation_rule    {rule}", "control_slaves     TRUE", "job_is_first_task  FALSE",
                      "urgency_slots      min", "accounting_summary TRUE", "qsort_args         NONE", ""])


def _queue(host: str, slots: int, notify: int) -> str:
    lines = ["qname all.q", f"hostlist {host}", "seq_no 0", "load_thresholds NONE", "suspend_thresholds NONE",
             "nsuspend 1", "suspend_interval 00:05:00", "priority 0", "min_cpu_interval 00:05:00",
             "processors UNDEFINED", "qtype BATCH INTERACTIVE", "ckpt_list NONE", "pe_list smp mpi", "rerun FALSE",
             f"slots {slots}", "tmpdir /tmp", "shell /bin/bash", "prolog NONE", "epilog NONE",
             "shell_start_mode unix_behavior", "starter_method NONE", "suspend_method NONE", "resume_method NONE",
             "terminate_method NONE", f"notify 00:00:{notify:02d}", "owner_list NONE", "user_lists NONE",
             "xuser_lists NONE", "subordinate_list NONE", "complex_values NONE", "projects NONE", "xprojects NONE",
             "calendar NONE", "initial_state default"]
    lines += [f"{lim} INFINITY" for lim in ("s_rt", "h_rt", "s_cpu", "h_cpu", "s_fsize", "h_fsize", "s_data", "h_data",
                                            "s_stack", "h_stack", "s_core", "h_core", "s_rss", "h_rss", "s_vmem",
                                            "h_vmem")]
    return "\n".join(lines) + "\n"


@dataclass
class GridEngine:
    base: Path
    host: str
    gpus: int
    slots: int
    env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def sge_root(self) -> Path:
        return self.base / "sge"

    @classmethod
    def start(cls, base: Path, gpus: int = 4, slots: int = 8, notify: int = 30) -> "GridEngine":
        binaries = ensure_binaries()
        share = Path(os.path.realpath(binaries)).parent.parent / "share" / "gridengine"
        base = Path(base)
        host, aliases = host_names()
        sge_root, spool = base / "sge", base / "spool"
        common = sge_root / CELL / "common"
        for d in (common, spool / "qmaster" / "job_scripts", spool / "execd", sge_root / "bin", sge_root / "utilbin"):
            d.mkdir(parents=True, exist_ok=True)
        arch = subprocess.run([str(share / "util" / "arch")], capture_output=True, text=True).stdout.strip() or "lx-amd64"
        for link, to in ((sge_root / "util", share / "util"), (sge_root / "bin" / arch, binaries),
                         (sge_root / "utilbin" / arch, binaries)):    # qrsh -inherit runs utilbin/<arch>/qrsh_starter
            if not link.is_symlink():
                link.symlink_to(to)
        (common / "bootstrap").write_text(_bootstrap(common, spool, binaries))
        (common / "act_qmaster").write_text(host + "\n")
        (common / "host_aliases").write_text(" ".join([host, *aliases]) + "\n")
        port = free_port(2)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SGE_", "JOB_", "PE_"))}
        env.update(SGE_ROOT=str(sge_root), SGE_CELL=CELL, SGE_QMASTER_PORT=str(port), SGE_EXECD_PORT=str(port + 1),
                   SGE_ARCH=arch, PATH=f"{binaries}:{env.get('PATH', '/usr/bin:/bin')}")
        init_env = {**env, "LD_LIBRARY_PATH": str(binaries)}
        conf = base / "global-configuration"
        conf.write_text(_global_config((share / "default-configuration").read_text(), spool))
        for argv in ([str(binaries / "spoolinit"), "classic", "libspoolc", f"{common};{spool / 'qmaster'}", "init"],
                     [str(binaries / "spooldefaults.bin"), "configuration", str(conf)],
                     [str(binaries / "spooldefaults.bin"), "complexes", str(share / "util/resources/centry")],
                     [str(binaries / "spooldefaults.bin"), "usersets", str(share / "util/resources/usersets")],
                     [str(binaries / "spooldefaults.bin"), "managers", "root"]):
            res = subprocess.run(argv, env=init_env, capture_output=True, text=True, cwd=base)
            if res.returncode != 0:
                raise TestbedUnavailable(f"{Path(argv[0]).name} {argv[1]} failed: {(res.stderr + res.stdout).strip()[-300:]}")
        cluster = cls(base=base, host=host, gpus=gpus, slots=slots, env=env)
        try:
            cluster._daemon("sge_qmaster")
            wait_for(lambda: cluster.run("qstat").returncode == 0, 30, "sge_qmaster", interval=0.2)
            cluster._configure(notify)
            cluster._daemon("sge_execd")
            wait_for(cluster._host_reports, 40, "sge_execd reporting", interval=0.3)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _configure(self, notify: int) -> None:
        work = self.base / "conf"
        work.mkdir(exist_ok=True)
        if self.host not in self.run("qconf", "-ss").stdout.split():
            self.qconf("-as", self.host)
        complexes = [line for line in self.run("qconf", "-sc").stdout.splitlines() if not line.startswith("gpu ")]
        complexes.append("gpu                 gpu        INT         <=    YES         JOB        0        0")
        (work / "complex").write_text("\n".join(complexes) + "\n")
        self.run("qconf", "-Mc", str(work / "complex"))   # exits non-zero when nothing changed
        sched = self.run("qconf", "-ssconf", check=True).stdout.splitlines()
        fast = {"schedule_interval": "0:0:1", "flush_submit_sec": "1", "flush_finish_sec": "1",
                "job_load_adjustments": "NONE", "load_adjustment_decay_time": "0:0:0", "schedd_job_info": "true"}
        (work / "sconf").write_text("\n".join(f"{line.split()[0]:<33} {fast[line.split()[0]]}"
                                              if line.split() and line.split()[0] in fast else line
                                              for line in sched) + "\n")
        self.qconf("-Msconf", str(work / "sconf"))
        (work / "exechost").write_text(f"hostname {self.host}\nload_scaling NONE\ncomplex_values gpu={self.gpus}\n"
                                       "user_lists NONE\nxuser_lists NONE\nprojects NONE\nxprojects NONE\n"
                                       "usage_scaling NONE\nreport_variables NONE\n")
        self.qconf("-Ae", str(work / "exechost"))
        for name, rule in (("smp", "$pe_slots"), ("mpi", "$fill_up")):
            (work / f"pe_{name}").write_text(_pe(name, rule))
            self.qconf("-Ap", str(work / f"pe_{name}"))
        (work / "all.q").write_text(_queue(self.host, self.slots, notify))
        self.qconf("-Aq", str(work / "all.q"))

    def qconf(self, *argv: str) -> str:
        res = self.run("qconf", *argv)
        if res.returncode != 0:
            raise TestbedUnavailable(f"qconf {' '.join(argv)} failed: {(res.stderr + res.stdout).strip()[-300:]}")
        return res.stdout

    def _daemon(self, name: str) -> None:
        """Start a daemon in the foreground (SGE_ND) as our child, so stop() can end and reap it."""
        out = open(self.base / f"{name}.out", "w")
        proc = subprocess.Popen([str(SYSTEM_BIN / name)], env={**self.env, "SGE_ND": "1"}, cwd=self.base,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        time.sleep(0.2)
        if proc.poll() is not None:
            raise TestbedUnavailable(f"{name} exited at start: {(self.base / f'{name}.out').read_text()[-300:]}")

    def _host_reports(self) -> bool:
        for line in self.run("qhost", "-h", self.host).stdout.splitlines():
            words = line.split()
            if words and words[0] == self.host and len(words) > 3 and words[3] != "-":
                return True
        return False

    def run(self, *argv: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=timeout, check=check,
                              cwd=self.base)

    def wait_gone(self, job_id: str, timeout: float = 60) -> None:
        wait_for(lambda: self.run("qstat", "-j", job_id).returncode != 0, timeout, f"job {job_id} to leave qstat",
                 interval=0.2)

    def stop(self) -> None:
        """Delete every job, then stop execd (and any job shepherd it left) and qmaster: our children only."""
        if self.procs and self.procs[0].poll() is None:
            try:
                if self.run("qstat", "-u", "*", timeout=10).stdout.strip():
                    self.run("qdel", "-f", "-u", "*", timeout=10)
                    deadline = time.monotonic() + 10
                    while time.monotonic() < deadline and self.run("qstat", "-u", "*", timeout=10).stdout.strip():
                        time.sleep(0.25)
            except subprocess.TimeoutExpired:
                pass
        for proc in reversed(self.procs):
            if proc.poll() is None:
                for child in _children(proc.pid):
                    try:
                        os.killpg(child, 15) if os.getpgid(child) == child else os.kill(child, 15)
                    except OSError:
                        pass
                proc.terminate()
            try:
                proc.wait(timeout=3)      # sge_qmaster takes ~9 s to shut down; the cell is thrown away
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def logs(self) -> str:
        """Tail of the daemons' output and messages files, for failure messages."""
        files = [*sorted(self.base.glob("*.out")), *sorted((self.base / "spool").rglob("messages"))]
        return "\n".join(f"--- {p.relative_to(self.base)}\n" + p.read_text(errors="replace")[-1500:] for p in files)


def _children(pid: int) -> list[int]:
    """Shepherds (and so jobs) that execd started; execd leaves them running when it stops."""
    out = subprocess.run(["ps", "-o", "pid=,comm=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if line.split()[1:] == ["sge_shepherd"]]
