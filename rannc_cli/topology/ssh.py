"""Run discovery commands on another host over SSH (paramiko), with verified host keys.

    runner = SSHRunner.connect("user@login.example")      # or "login" from ~/.ssh/config, "host:2222"
    runner.run(["sinfo", "-h"]).stdout
    runner.close()

Host keys are checked against ~/.ssh/known_hosts (and /etc/ssh/ssh_known_hosts): an unknown key
or a changed key is refused with a clear message, never accepted silently. Authentication uses
the SSH agent and the usual key files (~/.ssh/id_*, IdentityFile from ~/.ssh/config).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shlex
import socket
from pathlib import Path
from typing import Sequence

from rannc_cli.errors import RanncError
from rannc_cli.topology.runner import Result


def parse_target(target: str) -> tuple[str | None, str, int | None]:
    """``user@host:port`` -> (user, host, port); user and port optional."""
    user, _, hostport = target.rpartition("@")
    host, port = hostport, None
    if hostport.count(":") == 1:
        host, _, p = hostport.partition(":")
        if not p.isdigit():
            raise RanncError(f"--host {target!r}: port {p!r} is not a number", hint="use user@host or user@host:port")
        port = int(p)
    if not host:
        raise RanncError(f"--host {target!r} names no host", hint="use user@host or user@host:port")
    return user or None, host, port


def quiet_paramiko() -> None:
    """Keep paramiko's transport-thread reports (``Exception (client): ...`` and their tracebacks,
    ``Secsh channel 1 open FAILED``) off the terminal: rannc reports each failure in one line.
    ``RANNC_DEBUG=1`` leaves them on."""
    import logging
    import threading

    if os.environ.get("RANNC_DEBUG"):
        return
    log = logging.getLogger("paramiko")
    log.setLevel(logging.CRITICAL + 1)
    log.propagate = False
    if not any(isinstance(h, logging.NullHandler) for h in log.handlers):
        log.addHandler(logging.NullHandler())
    previous = threading.excepthook
    if getattr(previous, "_rannc_ssh", False):
        return

    def hook(args: "threading.ExceptHookArgs") -> None:  # a paramiko thread dying at exit is not news
        if type(args.thread).__module__.startswith("paramiko"):
            return
        previous(args)

    hook._rannc_ssh = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def _fingerprint(key) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class SSHRunner:
    """A Runner over one paramiko connection."""

    def __init__(self, client, host: str):
        self._client = client
        self.host = host

    @classmethod
    def connect(cls, target: str, timeout: float = 15.0) -> "SSHRunner":
        import paramiko

        quiet_paramiko()
        user, host, port = parse_target(target)
        home = Path(os.path.expanduser("~"))
        cfg: dict = {}
        config_path = home / ".ssh" / "config"
        if config_path.is_file():
            try:
                cfg = paramiko.SSHConfig.from_path(str(config_path)).lookup(host)
            except Exception as exc:
                raise RanncError(f"cannot read {config_path} ({' '.join(str(exc).split())})") from None
        hostname = cfg.get("hostname", host)
        port = port or int(cfg.get("port", 22))
        user = user or cfg.get("user") or _local_user()
        shown = f"{user}@{hostname}" + (f":{port}" if port != 22 else "")
        key_name = hostname if port == 22 else f"[{hostname}]:{port}"

        class _Refuse(paramiko.MissingHostKeyPolicy):
            def missing_host_key(self, client, name, key):
                raise RanncError(
                    f"host key of {key_name} is unknown (not in known_hosts); refusing to connect "
                    f"({key.get_name()} {_fingerprint(key)})",
                    hint=f"verify that fingerprint with the site's documentation, then add it: "
                         f"ssh -p {port} {user}@{hostname} once, or ssh-keyscan -p {port} {hostname} >> ~/.ssh/known_hosts")

        client = paramiko.SSHClient()
        for known in ("/etc/ssh/ssh_known_hosts", *(cfg.get("userknownhostsfile", "").split() or []),
                      str(home / ".ssh" / "known_hosts")):
            path = os.path.expanduser(known)
            if os.path.isfile(path):
                try:
                    client.load_host_keys(path) if path.startswith(str(home)) else client.load_system_host_keys(path)
                except Exception as exc:
                    raise RanncError(f"cannot read known_hosts file {path} ({' '.join(str(exc).split())})") from None
        client.set_missing_host_key_policy(_Refuse())
        keys = [os.path.expanduser(k) for k in cfg.get("identityfile", []) if os.path.isfile(os.path.expanduser(k))]
        try:
            client.connect(hostname, port=port, username=user, key_filename=keys or None, allow_agent=True,
                           look_for_keys=True, timeout=timeout, banner_timeout=timeout, auth_timeout=timeout)
        except RanncError:
            client.close()
            raise
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise RanncError(
                f"host key of {key_name} CHANGED: known_hosts has {_fingerprint(exc.expected_key)}, the server "
                f"sent {_fingerprint(exc.key)}; refusing to connect (possible man-in-the-middle)",
                hint=f"if the change is expected (ask the site), remove the old entry with ssh-keygen -R '{key_name}' "
                     "and add the new one") from None
        except paramiko.AuthenticationException:
            client.close()
            raise RanncError(f"login to {shown} failed: the server accepted none of the keys offered "
                             "(SSH agent, ~/.ssh/id_*, IdentityFile)",
                             hint="check the user name and that your public key is in the server's authorized_keys") from None
        except (paramiko.ssh_exception.NoValidConnectionsError, socket.timeout, TimeoutError, ConnectionError) as exc:
            client.close()
            raise RanncError(f"cannot connect to {hostname}:{port} ({' '.join(str(exc).split()) or type(exc).__name__})",
                             hint="check the host name, port and network (VPN, bastion)") from None
        except socket.gaierror as exc:
            client.close()
            raise RanncError(f"cannot resolve host {hostname!r} ({exc.strerror})",
                             hint="check the name or add it to ~/.ssh/config") from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            client.close()
            text = " ".join(str(exc).split()) or type(exc).__name__
            if "protocol banner" in text:
                raise RanncError(f"{hostname}:{port} did not answer as an SSH server ({text})",
                                 hint="check the host and port (an SSH login node listens on 22 unless the site "
                                      "says otherwise)") from None
            raise RanncError(f"SSH to {shown} failed ({text})",
                             hint=f"`ssh -v -p {port} {user}@{hostname}` shows where it stops") from None
        return cls(client, shown)

    def run(self, argv: Sequence[str] | str, timeout: float = 60) -> Result:
        command = argv if isinstance(argv, str) else shlex.join(argv)
        try:
            _, stdout, stderr = self._client.exec_command(command, timeout=timeout)
            out = stdout.read().decode(errors="replace")
            err = stderr.read().decode(errors="replace")
            rc = stdout.channel.recv_exit_status()
        except (socket.timeout, TimeoutError):
            return Result(124, "", f"{command} timed out after {timeout:.0f} s on {self.host}")
        except Exception as exc:
            raise RanncError(f"SSH command on {self.host} failed ({' '.join(str(exc).split())})") from None
        return Result(rc, out, err)

    def which(self, name: str) -> bool:
        return self.run(f"command -v {shlex.quote(name)}").rc == 0

    def env(self, name: str) -> str | None:
        """A remote login shell is not inside the user's job: no allocation variables there."""
        return None

    def close(self) -> None:
        self._client.close()


def _local_user() -> str:
    import getpass

    return getpass.getuser()
