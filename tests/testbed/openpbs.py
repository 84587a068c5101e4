"""A real OpenPBS server (pbs_server + datastore, pbs_sched, pbs_comm, pbs_mom) in a test-made network namespace.

    server = OpenPBSServer.start(Path("openpbs-bookworm.tgz"))   # unpacks to /opt/pbs, apt-installs its libraries
    server.env                  # PATH with /opt/pbs/bin and PBS_CONF_FILE: qsub/qstat/qdel reach the server
    server.run("qstat", "-B")   # CompletedProcess of a client command
    server.manage("set server scheduler_iteration = 5")   # qmgr as a PBS manager
    server.stop()

No Debian package of OpenPBS exists: the install tree is a prebuilt tarball for this machine kind,
found through ``RANNC_TEST_OPENPBS`` (tests/testbed/fixtures.py). PBS refuses 127.0.0.0/8 as its
own address, so the daemons run in network namespaces made here: ``rannc-pbs`` (server, scheduler,
comm and the first pbs_mom, 10.251.0.2) and ``rannc-pbs2`` (a second pbs_mom, 10.251.0.3), each
with its own hostname and a private mount namespace whose /etc/hosts maps the names, joined by a
bridge that holds this namespace's 10.251.0.1. Clients stay here and reach the server by address
(``PBS_SERVER_HOST_NAME``). No packet leaves the bridge. Jobs run as root (``acl_roots``,
``flatuid``); nodes ``rannc-pbs`` and ``rannc-pbs2`` offer 8 ncpus and 4 ``ngpus`` each (a
consumable resource: nothing checks real devices); job history is on (``qstat -x``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from testbed.common import TestbedUnavailable, wait_for

PBS_EXEC = Path("/opt/pbs")              # the prefix the tarball was built for
BASE = Path("/var/spool/rannc-openpbs")  # PBS_HOME's datastore is run by user postgres: not under a 0700 tmp dir
BRIDGE, HOST_ADDR = "rpbsbr", "10.251.0.1"
# (network namespace = hostname, address, host-side veth); the first runs the server
HOSTS = [("rannc-pbs", "10.251.0.2", "rpbs-a"), ("rannc-pbs2", "10.251.0.3", "rpbs-b")]
NETNS = HOSTNAME = HOSTS[0][0]
NS_ADDR = HOSTS[0][1]
NS_IF = "pbs0"
NCPUS, NGPUS = 8, 4
# run-time libraries of the build (the rest come with Debian's base image and postgresql)
PACKAGES = ["postgresql-15", "libical3", "libhwloc15", "libcjson1", "libedit2", "libpq5", "libpython3.11",
            "libtcl8.6", "libssl3", "libexpat1"]


def _sh(*argv: str, timeout: float = 60, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise TestbedUnavailable(f"{' '.join(argv)} failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
    return proc


def ensure_packages(packages: list[str]) -> None:
    """apt-get install the Debian packages that are not installed yet."""
    missing = [p for p in packages if "install ok installed" not in
               _sh("dpkg-query", "-W", "-f=${Status}", p, check=False).stdout]
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    argv = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300", *missing]
    if subprocess.run(argv, capture_output=True, env=env, timeout=600).returncode != 0:
        _sh("apt-get", "update", "-qq", env=env, timeout=600)
        _sh(*argv, env=env, timeout=600)


def _conf(server: str, home: Path, start: bool, server_host: str | None = None) -> str:
    flag = "1" if start else "0"
    lines = [f"PBS_SERVER={server}", *(f"PBS_START_{d}={flag}" for d in ("SERVER", "SCHED", "COMM", "MOM")),
             f"PBS_EXEC={PBS_EXEC}", f"PBS_HOME={home}", "PBS_CORE_LIMIT=unlimited", "PBS_SCP=/usr/bin/scp"]
    if server_host:
        lines.append(f"PBS_SERVER_HOST_NAME={server_host}")
    return "\n".join(lines) + "\n"


@dataclass
class OpenPBSServer:
    base: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def home(self) -> Path:
        return self.base / "home"

    @property
    def node(self) -> str:
        return HOSTNAME

    @classmethod
    def start(cls, tarball: Path, base: Path = BASE) -> "OpenPBSServer":
        if os.geteuid() != 0:
            raise TestbedUnavailable("OpenPBS needs root (network namespace, daemons, jobs run as root)")
        for tool in ("ip", "nsenter", "unshare", "apt-get"):
            if not shutil.which(tool) and not shutil.which(tool, path="/usr/sbin:/sbin"):
                raise TestbedUnavailable(f"{tool} not found")
        if not (PBS_EXEC / "sbin" / "pbs_server").exists():
            if not Path(tarball).is_file():
                raise TestbedUnavailable(f"{tarball} does not exist")
            _sh("tar", "xzf", str(tarball), "-C", "/", timeout=120)
        ensure_packages(PACKAGES)
        base.mkdir(parents=True, exist_ok=True, mode=0o755)
        server = cls(base=Path(base))
        server.env = {**os.environ, "PATH": f"{PBS_EXEC}/bin:{os.environ.get('PATH', '/usr/bin:/bin')}",
                      "PBS_CONF_FILE": str(server.base / "client.conf")}
        for var in [v for v in server.env if v.startswith("PBS_") and v != "PBS_CONF_FILE"]:
            server.env.pop(var)
        (server.base / "pbs.conf").write_text(_conf(HOSTNAME, server.home, True))
        (server.base / "client.conf").write_text(_conf(HOSTNAME, server.home, False, server_host=NS_ADDR))
        (server.base / "hosts").write_text("127.0.0.1\tlocalhost\n" + "".join(f"{a}\t{n}\n" for n, a, _ in HOSTS)
                                           + f"{HOST_ADDR}\trannc-pbs-client\n")
        for setuid in ("pbs_iff", "pbs_rcp"):
            os.chmod(PBS_EXEC / "sbin" / setuid, 0o4755)
        try:
            server._network()
            if not server._responding():
                server._daemons()
            wait_for(server._responding, 30, "pbs_server")
            server._configure()
            server._second_mom()
            for name, _, _ in HOSTS:
                wait_for(lambda: "state = free" in server.run("pbsnodes", name).stdout, 30, f"node {name} free",
                         interval=0.2)
        except BaseException:
            server.stop()
            raise
        return server

    # ------------------------------------------------------------------ setup steps
    def _network(self) -> None:
        """A bridge here and one namespace per host on it (kept when a previous session left them)."""
        if _sh("ip", "link", "show", BRIDGE, check=False).returncode != 0:
            _sh("ip", "link", "add", BRIDGE, "type", "bridge")
            _sh("ip", "addr", "add", f"{HOST_ADDR}/24", "dev", BRIDGE)
        _sh("ip", "link", "set", BRIDGE, "up")
        namespaces = _sh("ip", "netns", "list").stdout.split()
        for name, addr, host_if in HOSTS:
            if name not in namespaces:
                _sh("ip", "netns", "add", name)
            ns = ["ip", "netns", "exec", name]
            if _sh("ip", "link", "show", host_if, check=False).returncode != 0:
                _sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", NS_IF, "netns", name)
                _sh("ip", "link", "set", host_if, "master", BRIDGE)
                _sh(*ns, "ip", "addr", "add", f"{addr}/24", "dev", NS_IF)
            _sh("ip", "link", "set", host_if, "up")
            _sh(*ns, "ip", "link", "set", NS_IF, "up")
            _sh(*ns, "ip", "link", "set", "lo", "up")

    def _second_mom(self) -> None:
        """pbs_mom of node rannc-pbs2: its own namespaces, PBS_HOME (home2) and configuration."""
        name = HOSTS[1][0]
        home = self.base / "home2"
        conf = self.base / "pbs2.conf"
        conf.write_text(_conf(HOSTNAME, home, False).replace("PBS_START_MOM=0", "PBS_START_MOM=1"))
        if not (home / "mom_priv").is_dir():
            for sub, mode in (("aux", 0o755), ("mom_logs", 0o755), ("checkpoint", 0o700), ("mom_priv", 0o751),
                              ("mom_priv/jobs", 0o751), ("mom_priv/hooks", 0o750), ("mom_priv/hooks/tmp", 0o750),
                              ("spool", 0o1777), ("undelivered", 0o1777)):
                (home / sub).mkdir(parents=True, exist_ok=True)
                os.chmod(home / sub, mode)
            for f in ("pbs_environment", "pbs_version"):
                shutil.copy(self.home / f, home / f)
            shutil.copy(self.home / "mom_priv" / "config", home / "mom_priv" / "config")
        lock = home / "mom_priv" / "mom.lock"
        if not (lock.is_file() and Path(f"/proc/{lock.read_text().strip()}").exists()):
            inner = (f"hostname {name} && mount --bind {self.base}/hosts /etc/hosts && "
                     f"PBS_CONF_FILE={conf} exec {PBS_EXEC}/sbin/pbs_mom")
            _sh("nsenter", f"--net=/run/netns/{name}", "unshare", "-m", "-u", "--propagation", "private",
                "sh", "-c", inner, stdin=subprocess.DEVNULL)
        if self.manage(f"list node {name}", inside=True, check=False).returncode != 0:
            self.manage(f"create node {name}", inside=True)
        self.manage(f"set node {name} resources_available.ncpus = {NCPUS}", inside=True)
        self.manage(f"set node {name} resources_available.ngpus = {NGPUS}", inside=True)

    def _daemons(self) -> None:
        """pbs_init.d start inside the namespace (the first start creates PBS_HOME and the datastore)."""
        inner = (f"hostname {HOSTNAME} && mount --bind {self.base}/hosts /etc/hosts && "
                 f"PBS_CONF_FILE={self.base}/pbs.conf exec {PBS_EXEC}/libexec/pbs_init.d start")
        log = self.base / "start.log"
        with open(log, "w") as out:
            proc = subprocess.run(["nsenter", f"--net=/run/netns/{NETNS}", "unshare", "-m", "-u",
                                   "--propagation", "private", "sh", "-c", inner],
                                  stdout=out, stderr=subprocess.STDOUT, timeout=180, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise TestbedUnavailable(f"pbs_init.d start failed: {log.read_text()[-400:]}")

    def _configure(self) -> None:
        """Root may submit and manage from this namespace; ngpus is a scheduled resource; history is kept."""
        for command in ("set server managers = root@*", "set server operators = root@*",
                        "set server acl_roots = root", "set server flatuid = True",
                        "set server job_history_enable = True", "set server scheduler_iteration = 5"):
            self.manage(command, inside=True)
        if self.manage("list resource ngpus", inside=True, check=False).returncode != 0:
            self.manage("create resource ngpus type=long, flag=nh", inside=True)
        self.manage(f"set node {HOSTNAME} resources_available.ncpus = {NCPUS}", inside=True)
        self.manage(f"set node {HOSTNAME} resources_available.ngpus = {NGPUS}", inside=True)
        hup: list[str] = []
        sched = self.home / "sched_priv" / "sched_config"
        text = sched.read_text()
        if "ngpus" not in next(line for line in text.splitlines() if line.startswith("resources:")):
            sched.write_text("\n".join(line[:-1] + ', ngpus"' if line.startswith("resources:") else line
                                       for line in text.splitlines()) + "\n")
            hup.append((self.home / "sched_priv" / "sched.lock").read_text().strip())
        mom = self.home / "mom_priv" / "config"
        if "$usecp" not in mom.read_text():
            # stage job output with cp (no scp keys); poll often so walltime and kills are prompt
            with open(mom, "a") as f:
                f.write("$usecp *:/ /\n$min_check_poll 1\n$max_check_poll 2\n")
            hup.append((self.home / "mom_priv" / "mom.lock").read_text().strip())
        if hup:
            _sh("kill", "-HUP", *sorted(set(hup)))
            time.sleep(1)
        environment = self.home / "pbs_environment"
        if "PBS_CONF_FILE" not in environment.read_text():
            # jobs' own qstat/qrerun find the server through the daemons' configuration; pbs_mom reads
            # this file only when it starts
            with open(environment, "a") as f:
                f.write(f"PBS_CONF_FILE={self.base}/pbs.conf\n")
            self._restart_mom()

    def _restart_mom(self) -> None:
        lock = self.home / "mom_priv" / "mom.lock"
        old = lock.read_text().strip()
        server = (self.home / "server_priv" / "server.lock").read_text().strip()
        _sh("kill", old)
        wait_for(lambda: not Path(f"/proc/{old}").exists(), 20, "pbs_mom to stop")
        _sh("nsenter", "-t", server, "-m", "-n", "-u", "--", "env", f"PBS_CONF_FILE={self.base}/pbs.conf",
            f"{PBS_EXEC}/sbin/pbs_mom")

    def _responding(self) -> bool:
        try:
            return self.run("qstat", "-B", timeout=10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    # ------------------------------------------------------------------ use
    def run(self, *argv: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=timeout, check=check)

    def manage(self, command: str, inside: bool = False, check: bool = True) -> subprocess.CompletedProcess:
        """qmgr -c COMMAND; ``inside``: from the server's own namespace (root there is a manager from the start)."""
        prefix = ["nsenter", f"--net=/run/netns/{NETNS}"] if inside else []
        proc = subprocess.run([*prefix, f"{PBS_EXEC}/bin/qmgr", "-c", command], env=self.env, capture_output=True,
                              text=True, timeout=60)
        if check and proc.returncode != 0:
            raise TestbedUnavailable(f"qmgr -c {command!r}: {(proc.stderr or proc.stdout).strip()[-300:]}")
        return proc

    def logs(self) -> str:
        """Today's server and mom log tails, for failure messages."""
        out = []
        for sub in ("server_logs", "mom_logs", "sched_logs"):
            files = sorted((self.home / sub).glob("*")) if (self.home / sub).is_dir() else []
            if files:
                out.append(f"--- {sub}/{files[-1].name}\n" + files[-1].read_text(errors="replace")[-2000:])
        return "\n".join(out)

    def stop(self) -> None:
        """Delete every job, stop the daemons (pbs_init.d stop inside their namespaces), remove the namespace."""
        lock = self.home / "server_priv" / "server.lock"
        pid = lock.read_text().strip() if lock.is_file() else ""
        if pid and Path(f"/proc/{pid}").exists():
            jobs = self.run("qselect", timeout=20).stdout.split() if self._responding() else []
            if jobs:
                self.run("qdel", "-Wforce", *jobs, timeout=30)
            subprocess.run(["nsenter", "-t", pid, "-m", "-n", "-u", "--", f"{PBS_EXEC}/libexec/pbs_init.d", "stop"],
                           env={**self.env, "PBS_CONF_FILE": str(self.base / "pbs.conf")}, capture_output=True,
                           timeout=120)
        lock2 = self.base / "home2" / "mom_priv" / "mom.lock"
        pid2 = lock2.read_text().strip() if lock2.is_file() else ""
        if pid2 and Path(f"/proc/{pid2}").exists():
            subprocess.run(["kill", pid2], capture_output=True)
            try:
                wait_for(lambda: not Path(f"/proc/{pid2}").exists(), 20, "second pbs_mom to stop")
            except TestbedUnavailable:
                subprocess.run(["kill", "-9", pid2], capture_output=True)
        for name, _, host_if in HOSTS:
            subprocess.run(["ip", "link", "del", host_if], capture_output=True)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
