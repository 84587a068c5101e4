"""Atomic file writes: a reader never sees half a file, a crash never loses the old one.

    write_text_atomic(Path("prof.yaml"), text)
"""

from __future__ import annotations

import errno
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A temporary path beside ``path``; renamed over it when the block succeeds, removed otherwise.

        with atomic_path("model.pt") as tmp:
            torch.save(state, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        fsync_path(Path(tmp))  # the data is on disk before the name points at it
        os.replace(tmp, path)
        fsync_path(path.parent)  # and the rename itself survives a crash
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fsync_path(path: Path | str) -> None:
    """Flush a file's or a folder's content to disk (a folder: its entries, such as a rename).

        fsync_path(folder)       # after os.replace(tmp, folder / "x")
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems refuse fsync on folders; a file's refusal is an error
        if not (os.path.isdir(path) and exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def write_text_atomic(path: Path | str, text: str, mode: int | None = None) -> Path:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
    return path


def read_yaml(path: Path | str, what: str, create_hint: str) -> Any:
    """Parse a YAML file the user pointed at; every failure is one RanncError line.

        data = read_yaml("plan.yaml", "plan file", "create one with `rannc plan --out FILE`")
    """
    import yaml

    from rannc_cli.errors import RanncError

    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RanncError(f"{what} {path} does not exist", hint=create_hint) from None
    except IsADirectoryError:
        raise RanncError(f"{what} {path} is a directory, not a file", hint=create_hint) from None
    except (PermissionError, UnicodeDecodeError) as exc:
        raise RanncError(f"cannot read {what} {path} ({type(exc).__name__})", hint=create_hint) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RanncError(f"{what} {path} is not valid YAML ({' '.join(str(exc).split())[:200]})",
                         hint=create_hint) from None


def require_file(path: Path | str, what: str, hint: str) -> Path:
    """Refuse a path that is missing or not a regular file, saying which (one RanncError line).

        script = require_file("train.py", "script", "pass the path of your training script")
    """
    from rannc_cli.errors import RanncError

    path = Path(path)
    if path.is_dir():
        raise RanncError(f"{what} {path} is a directory, not a file", hint=hint)
    if not path.is_file():
        raise RanncError(f"{what} {path} does not exist", hint=hint)
    return path
