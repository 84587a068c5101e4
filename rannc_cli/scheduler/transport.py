"""Where scheduler commands run and job files live: this machine, or a login node over SSH/SFTP.

    with open_transport(None) as t:                       # this machine
        t.run(["sbatch", "--parsable", "train.sh"])
    with open_transport("me@login.example") as t:         # paramiko, host key verified (topology/ssh.py)
        t.mkdir_private("rannc-jobs/x"); t.write_text("rannc-jobs/x/train.sh", text, 0o700)
        t.read_text("rannc-jobs/x/train/rannc-exitcode")

Both speak the topology Runner protocol (``run``, ``which``, ``env``) so discovery code runs
through them unchanged.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Sequence

from rannc_cli.errors import RanncError
from rannc_cli.fileio import write_text_atomic
from rannc_cli.topology.runner import LocalRunner, Result


class LocalTransport(LocalRunner):
    host = "local"
    remote = False

    def write_text(self, path: str, text: str, mode: int = 0o600) -> None:
        write_text_atomic(path, text, mode=mode, what="job file")

    def read_text(self, path: str) -> str | None:
        try:
            return Path(path).read_text(errors="replace")
        except (FileNotFoundError, NotADirectoryError):
            return None

    def read_from(self, path: str, offset: int) -> tuple[str, int] | None:
        """Text from byte ``offset`` to the end, and the new offset (None when the file is absent)."""
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                data = handle.read()
        except FileNotFoundError:
            return None
        return data.decode(errors="replace"), offset + len(data)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except FileNotFoundError:
            return []

    def mkdir_private(self, path: str) -> str:
        Path(path).mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path, 0o700)
        return str(Path(path).resolve())

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SSHTransport:
    """Commands over one SSH connection, files over SFTP on the same connection."""

    remote = True

    def __init__(self, target: str):
        from rannc_cli.topology.ssh import SSHRunner

        self._runner = SSHRunner.connect(target)
        self.host = self._runner.host
        try:
            # SSHRunner keeps its paramiko client private; SFTP rides the same verified connection.
            self._sftp = self._runner._client.open_sftp()
        except Exception as exc:  # noqa: BLE001 - paramiko raises several kinds
            self._runner.close()
            raise RanncError(f"SFTP to {self.host} failed ({' '.join(str(exc).split()) or type(exc).__name__})",
                             hint="the login node must allow the sftp subsystem") from None

    # Runner protocol
    def run(self, argv: Sequence[str] | str, timeout: float = 60) -> Result:
        return self._runner.run(argv, timeout=timeout)

    def which(self, name: str) -> bool:
        return self._runner.which(name)

    def env(self, name: str) -> str | None:
        return None

    # files
    def _io(self, what: str, path: str, exc: Exception) -> RanncError:
        return RanncError(f"SFTP {what} {path} on {self.host} failed ({' '.join(str(exc).split()) or type(exc).__name__})")

    def write_text(self, path: str, text: str, mode: int = 0o600) -> None:
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with self._sftp.open(tmp, "w") as handle:
                handle.write(text.encode())
            self._sftp.chmod(tmp, mode)
            self._sftp.posix_rename(tmp, path)
        except OSError as exc:
            try:  # no half-written temporary file left on the login node (disk full, quota)
                self._sftp.remove(tmp)
            except OSError:
                pass
            raise self._io("write", path, exc) from None

    def read_text(self, path: str) -> str | None:
        try:
            with self._sftp.open(path, "r") as handle:
                return handle.read().decode(errors="replace")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._io("read", path, exc) from None

    def read_from(self, path: str, offset: int) -> tuple[str, int] | None:
        try:
            with self._sftp.open(path, "r") as handle:
                handle.seek(offset)
                data = handle.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._io("read", path, exc) from None
        return data.decode(errors="replace"), offset + len(data)

    def exists(self, path: str) -> bool:
        try:
            self._sftp.stat(path)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self._io("stat", path, exc) from None

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(self._sftp.listdir(path))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise self._io("list", path, exc) from None

    def mkdir_private(self, path: str) -> str:
        """Create ``path`` (relative paths are under the remote home) and its parents; the leaf 0700."""
        try:
            if not path.startswith("/"):
                path = self._sftp.normalize(".").rstrip("/") + "/" + path
            parts = path.strip("/").split("/")
            cur = ""
            for part in parts:
                cur += "/" + part
                try:
                    st = self._sftp.stat(cur)
                    if not stat.S_ISDIR(st.st_mode):
                        raise RanncError(f"{cur} on {self.host} exists and is not a folder")
                except FileNotFoundError:
                    self._sftp.mkdir(cur, mode=0o700)
            self._sftp.chmod(path, 0o700)
        except OSError as exc:
            raise self._io("mkdir", path, exc) from None
        return path

    def close(self) -> None:
        try:
            self._sftp.close()
        finally:
            self._runner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_transport(host: str | None):
    """LocalTransport for None, else an SSHTransport to ``host`` (user@host[:port] or an ssh_config alias)."""
    return SSHTransport(host) if host else LocalTransport()
