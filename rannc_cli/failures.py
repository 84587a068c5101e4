"""Every way a command can fail, turned into one line on stderr and an exit code (docs/errors.md).

    try:
        app(args=argv, standalone_mode=False)
    except BaseException as exc:
        return report(exc)          # prints ``error: ...`` and returns 2, 70, 130, ...

Usage errors (bad option values, unknown options or commands, missing options) come from click,
which typer either depends on or vendors (typer >= 0.2x ships it as ``typer._click``); their
classes are found through ``typer.BadParameter``'s bases, so no ``import click`` is needed.
``RANNC_DEBUG=1`` prints the traceback of an unexpected error or of a RanncError's cause.
"""

from __future__ import annotations

import errno
import os
import re
import sys

from rannc_cli.errors import RanncError

USER_ERROR = 2
INTERNAL_ERROR = 70  # sysexits EX_SOFTWARE: a bug in rannc, not in the input
INTERRUPTED = 130

_OS_HINTS = {
    errno.ENOSPC: "free space on that file system or write somewhere else",
    errno.EDQUOT: "your disk quota is used up: free space or write somewhere else",
    errno.EACCES: "check its permissions, or choose a path you can write",
    errno.EPERM: "check its permissions, or choose a path you can write",
    errno.EROFS: "that file system is read-only: choose a writable path",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder: give a file name",
    errno.EMFILE: "too many open files: raise `ulimit -n`",
}


def os_error_line(exc: OSError, doing: str = "", path: object = None) -> str:
    """``cannot write plan file p.yaml: No space left on device (ENOSPC); free space ...``.

        os_error_line(OSError(28, "No space left on device", "p.yaml"), "write plan file")

    ``path`` (default: the exception's file name) is the file the user knows, e.g. the target
    of an atomic write rather than its temporary file.
    """
    name = errno.errorcode.get(exc.errno or 0, "")
    path = path if path is not None else exc.filename if exc.filename is not None else ""
    what = f"cannot {doing} {path}".rstrip() if doing else (f"{path}" if path else "system error")
    reason = exc.strerror or str(exc) or type(exc).__name__
    hint = _OS_HINTS.get(exc.errno or -1, "")
    line = f"{what}: {reason}" + (f" ({name})" if name else "")
    return line + (f"; {hint}" if hint else "")


def os_error(exc: OSError, doing: str, path: object = None) -> RanncError:
    """A RanncError for an OSError met while ``doing`` (e.g. "write profile file") on ``path``."""
    message = os_error_line(exc, doing, path)
    text, _, hint = message.partition("; ")
    return RanncError(text, hint=hint or None, cause=exc)


def silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush of unwritable output is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def flush_stdout() -> None:
    """Flush stdout now, so that a full disk or closed pipe is reported like any other error."""
    try:
        sys.stdout.flush()
    except ValueError:  # stdout closed by the command itself
        pass


def _usage_classes() -> tuple[type, type]:
    """(ClickException, UsageError) of the click that typer uses (installed or vendored)."""
    import typer

    bases = typer.BadParameter.__mro__
    click_exception = next(c for c in bases if c.__name__ == "ClickException")
    usage_error = next(c for c in bases if c.__name__ == "UsageError")
    return click_exception, usage_error


def _usage_line(exc: BaseException, usage_error: type, command: str) -> str:
    ctx = getattr(exc, "ctx", None)
    if getattr(ctx, "parent", None) is not None or command == "rannc":  # a sub-command's own context
        command = getattr(ctx, "command_path", "") or command
    message = re.sub(r"\.\s+", "; ", " ".join(str(exc.format_message()).split())).rstrip(".")  # type: ignore[attr-defined]
    if message[:1].isupper() and not message[1:2].isupper():
        message = message[0].lower() + message[1:]
    if isinstance(exc, usage_error):
        return f"error: {message}; see `{command} --help`"
    return f"error: {message}"


def _echo(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:  # stderr itself is gone (closed pipe): the exit code still tells
        pass


def _debug_traceback(exc: BaseException | None) -> None:
    if exc is not None and os.environ.get("RANNC_DEBUG"):
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__)


def report(exc: BaseException, command: str = "rannc") -> int:
    """Print ``exc`` as one ``error:`` line (help text for a bare `rannc`) and return the exit code.

    ``command`` (e.g. "rannc plan") is the command the user typed, for the `--help` pointer.
    """
    if isinstance(exc, RanncError):
        _debug_traceback(exc.cause)
        _echo(f"error: {exc.one_line()}")
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        _echo("interrupted")
        return INTERRUPTED
    click_exception, usage_error = _usage_classes()
    if isinstance(exc, click_exception):
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare `rannc`: the help is the answer
            print(exc.format_message())  # type: ignore[attr-defined]
            return 0
        _echo(_usage_line(exc, usage_error, command))
        return int(getattr(exc, "exit_code", USER_ERROR) or USER_ERROR)
    if isinstance(exc, BrokenPipeError):  # `rannc jobs | head`: the reader left; not an error of ours
        silence_stdout()
        return 1
    if isinstance(exc, OSError):
        _debug_traceback(exc)
        if exc.filename is None:  # most likely our own output (stdout to a full disk): stop writing there
            silence_stdout()
            _echo(f"error: {os_error_line(exc, 'write the output')}")
        else:
            _echo(f"error: {os_error_line(exc)}")
        return USER_ERROR
    if isinstance(exc, MemoryError):
        _echo("error: out of memory; close other programs or use a machine with more memory")
        return INTERNAL_ERROR
    _debug_traceback(exc)
    text = " ".join(str(exc).split())[:300]
    _echo(f"error: internal error in rannc: {type(exc).__name__}" + (f": {text}" if text else "") +
          "; please report it (RANNC_DEBUG=1 for the traceback)")
    return INTERNAL_ERROR
