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
def atomic_path(path: Path | str, what: str = "file") -> Iterator[Path]:
    """A temporary path beside ``path``; renamed over it when the block succeeds, removed otherwise.

        with atomic_path("model.pt", what="checkpoint") as tmp:
            torch.save(state, tmp)

    An OSError (disk full, permission, read-only file system) becomes one RanncError naming
    ``path`` and ``what`` was being written; the old file, if any, is left as it was.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # a file where a folder of the path should be
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path.parent)) from None
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        fsync_path(Path(tmp))  # the data is on disk before the name points at it
        os.replace(tmp, path)
        fsync_path(path.parent)  # and the rename itself survives a crash
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            from rannc_cli.failures import os_error

            raise os_error(exc, f"write {what}", path) from None
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


def write_text_atomic(path: Path | str, text: str, mode: int | None = None, what: str = "file") -> Path:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename.

        write_text_atomic("plan.yaml", text, what="plan file")
    """
    path = Path(path)
    with atomic_path(path, what) as tmp:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
    return path


def copy_file_atomic(source: Path | str, path: Path | str, what: str = "file", mode: int | None = None) -> Path:
    """Copy ``source`` to ``path`` so that ``path`` is either the whole copy or untouched.

        copy_file_atomic("prof.yaml", job_dir / "profile.yaml", what="job profile")
    """
    import shutil

    path = Path(path)
    try:
        src = open(source, "rb")
    except OSError as exc:
        from rannc_cli.failures import os_error

        raise os_error(exc, f"read {what} source", Path(source)) from None
    with src, atomic_path(path, what) as tmp:
        with open(tmp, "wb") as handle:
            shutil.copyfileobj(src, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
    return path


DATA_SUFFIXES = {".json": "json", ".yaml": "yaml", ".yml": "yaml"}


def data_format(path: Path | str, flag: str = "--out") -> str:
    """``json`` or ``yaml`` from the file name's suffix; any other suffix is refused.

        data_format("plan.json")     # 'json'
    """
    suffix = Path(path).suffix.lower()
    if suffix not in DATA_SUFFIXES:
        from rannc_cli.errors import RanncError

        raise RanncError(f"{flag} {path}: rannc writes .yaml, .yml or .json files, not {suffix or 'a name without suffix'}",
                         hint="name the file .yaml (or .json for JSON)")
    return DATA_SUFFIXES[suffix]


def write_data_atomic(path: Path | str, data: Any, header: str = "", what: str = "file") -> Path:
    """Write ``data`` as JSON or YAML (by ``path``'s suffix, see data_format), atomically.

        write_data_atomic("plan.json", plan_dict, what="plan file")

    ``header`` (YAML comment lines) goes only into YAML files. Both forms load with read_yaml.
    """
    if data_format(path) == "json":
        import json

        text = json.dumps(data, indent=2) + "\n"
    else:
        import yaml

        text = header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)
    return write_text_atomic(path, text, what=what)


def yaml_problem(exc: Exception) -> str:
    """``line 2: expected ',' or ']'``: a YAML error in a few words."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or " ".join(str(exc).split())[:200]
    return f"line {mark.line + 1}: {problem}" if mark is not None else problem


def read_yaml(path: Path | str, what: str, create_hint: str) -> Any:
    """Parse a YAML (or, by its .json suffix, JSON) file the user pointed at; every failure is one RanncError line.

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
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise RanncError(f"cannot read {what} {path} ({reason})", hint=create_hint) from None
    if path.suffix.lower() == ".json":  # YAML 1.1 would read JSON's 8e-06 as a string
        import json

        try:
            return json.loads(text)
        except ValueError as exc:
            raise RanncError(f"{what} {path} is not valid JSON ({exc})", hint=create_hint) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RanncError(f"{what} {path} is not valid YAML ({yaml_problem(exc)})",
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
