"""A real OpenSSH server on 127.0.0.1 with its own host key and one authorized client key.

    server = SSHServer.start(tmp_dir, set_env={"SLURM_CONF": conf})   # installs openssh-server if missing
    home = server.client_home(tmp_dir / "home")    # HOME with .ssh/id_ed25519 and known_hosts for this server
    server.target                                  # "root@127.0.0.1:PORT"
    server.stop()

Only loopback is touched. ``set_env`` becomes sshd's ``SetEnv`` (what a login node's profile
would provide, e.g. SLURM_CONF of the Slurm testbed).
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from testbed.common import TestbedUnavailable, ensure_commands, free_port, sbin, wait_for


@dataclass
class SSHServer:
    base: Path
    port: int
    user: str
    client_key: Path
    known_hosts_line: str
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def target(self) -> str:
        return f"{self.user}@127.0.0.1:{self.port}"

    @classmethod
    def start(cls, base: Path, set_env: dict[str, str] | None = None) -> "SSHServer":
        ensure_commands({"sshd": "openssh-server", "ssh-keygen": "openssh-client", "ssh-keyscan": "openssh-client"})
        base = Path(base)
        base.mkdir(parents=True, exist_ok=True)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        host_key, client_key = base / "host_ed25519", base / "client_ed25519"
        for key in (host_key, client_key):
            if not key.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        shutil.copy(f"{client_key}.pub", base / "authorized_keys")
        port = free_port()
        lines = [f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}", f"PidFile {base}/sshd.pid",
                 f"AuthorizedKeysFile {base}/authorized_keys", "PubkeyAuthentication yes",
                 "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
                 "UsePAM no", "StrictModes no", "X11Forwarding no", "PrintMotd no", "LogLevel VERBOSE",
                 "Subsystem sftp internal-sftp"]   # file transfer for `rannc submit --host`
        if set_env:
            lines.append("SetEnv " + " ".join(f"{k}={v}" for k, v in set_env.items()))
        conf = base / "sshd_config"
        conf.write_text("\n".join(lines) + "\n")
        log = open(base / "sshd.log", "w")
        proc = subprocess.Popen([sbin("sshd"), "-D", "-e", "-f", str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        server = cls(base=base, port=port, user=getpass.getuser(), client_key=client_key, known_hosts_line="", proc=proc)

        def scanned() -> bool:
            if proc.poll() is not None:
                raise TestbedUnavailable(f"sshd exited: {(base / 'sshd.log').read_text()[-300:]}")
            out = subprocess.run(["ssh-keyscan", "-T", "2", "-t", "ed25519", "-p", str(port), "127.0.0.1"],
                                 capture_output=True, text=True).stdout.strip()
            server.known_hosts_line = out
            return bool(out)

        try:
            wait_for(scanned, 15, "sshd", interval=0.2)
        except BaseException:
            server.stop()
            raise
        return server

    def client_home(self, home: Path, known: bool = True, authorized: bool = True) -> Path:
        """A HOME for the client: ~/.ssh/id_ed25519 (authorized, unless not) and known_hosts (with this server, unless not)."""
        ssh = Path(home) / ".ssh"
        ssh.mkdir(parents=True, exist_ok=True, mode=0o700)
        if authorized:
            shutil.copy(self.client_key, ssh / "id_ed25519")
        else:
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ssh / "id_ed25519")], check=True)
        os.chmod(ssh / "id_ed25519", 0o600)
        (ssh / "known_hosts").write_text(self.known_hosts_line + "\n" if known else "")
        return Path(home)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
