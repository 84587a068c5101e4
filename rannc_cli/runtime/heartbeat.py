"""Heartbeats: each rank beats into a file; a watcher names the rank whose beats stopped first.

    start(env)                                  # Engine.__init__: beat (and watch the next rank)
    watch = BeatWatch(folder, ranks=[0, 1, 2])  # `rannc run`: watch every rank's beat file
    watch.poll()                                # -> [(rank, seconds since its beat last changed)]

A rank's beat is a daemon thread that rewrites ``<heartbeat_dir>/rank-<R>.beat`` (a counter) every
``hang_timeout_seconds / 10`` (0.2 to 2 s; on a full disk it only touches the file's mtime,
which watchers count too). It keeps beating while the main thread computes,
profiles or waits in a collective, and stops when the process is stopped (SIGSTOP, a frozen node)
or killed; a clean exit writes ``done``. A watcher never compares clocks between machines: it
notes on its own monotonic clock when a beat file last changed, so a shared file system across
nodes works (close-to-open consistency is enough: every poll opens the file again).

Who watches: `rannc run` watches every local rank (rannc_cli.runtime.launcher). Each rank also
watches the next rank ``(R + 1) % N`` in its own thread, which covers jobs started by srun or
mpiexec with no launcher of ours: when that rank's beat has not changed for
``hang_timeout_seconds`` the watcher prints ``error: rank K stopped answering ...`` and exits with
code 3, which makes srun ``--kill-on-bad-exit``, the MPI launcher or `rannc run` end the job.
``heartbeat_dir`` comes from `rannc run` or the job script (``RANNC_HEARTBEAT_DIR``); without it
(torchrun by hand) there are no heartbeats and only ``runtime_timeout`` bounds a hang.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from pathlib import Path

PEER_LOST = 3  # exit code: this rank lost contact with a peer that failed or stopped answering
DONE = "done"
FAILED = "failed"


def hang_timeout() -> float:
    """The `hang_timeout_seconds` setting (0 or less: heartbeats off)."""
    from rannc_cli.config import settings

    return float(settings.get("hang_timeout_seconds"))


def beat_path(folder: Path | str, rank: int) -> Path:
    return Path(folder) / f"rank-{rank}.beat"


def beat_interval(timeout: float) -> float:
    return max(0.2, min(2.0, timeout / 10))


class BeatWatch:
    """Notes when each watched rank's beat file last changed (on this process's monotonic clock)."""

    def __init__(self, folder: Path | str, ranks: list[int]):
        self.folder = Path(folder)
        now = time.monotonic()
        self.seen: dict[int, tuple[tuple[str, int] | None, float]] = {r: (self._read(r), now) for r in ranks}
        self.beating: set[int] = set()  # ranks whose beat changed since this watch began
        self.done: set[int] = set()
        self.failed: dict[int, str] = {}  # rank -> the uncaught exception it is exiting with

    def _read(self, rank: int) -> tuple[str, int] | None:
        """(content, mtime in ns): a beat changes either (a full disk leaves only the mtime to change)."""
        try:
            with open(beat_path(self.folder, rank)) as fh:
                return fh.read(), os.fstat(fh.fileno()).st_mtime_ns
        except OSError:
            return None

    def poll(self, ranks: list[int] | None = None) -> list[tuple[int, float]]:
        """Read the beats again; return (rank, seconds without a change) of live ranks, oldest first."""
        now = time.monotonic()
        ages = []
        for rank in self.seen if ranks is None else ranks:
            if rank in self.done:
                continue
            value = self._read(rank)
            last, since = self.seen[rank]
            if value is not None and value != last:
                self.seen[rank] = (value, now)
                self.beating.add(rank)
                since = now
            text = value[0] if value is not None else ""
            if rank in self.beating and text.split(" ", 1)[0].strip() in (DONE, FAILED):
                self.done.add(rank)  # a "done" left by an earlier run of a requeued job does not count
                if text.startswith(FAILED):
                    self.failed[rank] = text[len(FAILED):].strip()
                continue
            ages.append((rank, now - since))
        return sorted(ages, key=lambda item: -item[1])

    def started(self, rank: int) -> bool:
        """True once the rank has beaten since this watch began (it reached its first forward)."""
        return rank in self.beating


class Heartbeat:
    """This rank's beat thread (it also watches the next rank); see the module docstring."""

    def __init__(self, folder: Path, rank: int, world: int, timeout: float):
        self.folder, self.rank, self.world, self.timeout = folder, rank, world, timeout
        self.path = beat_path(folder, rank)
        self.stop = threading.Event()
        self.count = 0
        peer = (rank + 1) % world
        self.watch = BeatWatch(folder, [peer]) if world > 1 else None
        self.thread = threading.Thread(target=self._run, name="rannc-heartbeat", daemon=True)

    def _write(self, text: str) -> None:
        try:
            with open(self.path, "w") as fh:
                fh.write(text)
        except OSError:  # a full disk: a new mtime needs no space, and watchers count it as a beat
            try:
                os.utime(self.path)
            except OSError:
                pass  # a vanished folder must not kill training from this thread

    def _run(self) -> None:
        interval = beat_interval(self.timeout)
        while not self.stop.is_set():
            self.count += 1
            self._write(f"{os.getpid()} {self.count}\n")
            if self.watch is not None:
                for peer, age in self.watch.poll():
                    if age > self.timeout and not self.stop.is_set():
                        self._give_up(peer, age)
            self.stop.wait(interval)

    def _give_up(self, peer: int, age: float) -> None:
        print(f"error: rank {peer} stopped answering: its heartbeat has not changed for {age:.0f} s "
              f"(hang_timeout_seconds {self.timeout:g}); it is hung, stopped or its machine froze; "
              f"rank {self.rank} ends the job (see rank {peer}'s log for its last words)", file=sys.stderr, flush=True)
        os._exit(PEER_LOST)

    def start(self) -> "Heartbeat":
        self._write(f"{os.getpid()} 0\n")
        self.thread.start()
        atexit.register(self.close)
        return self

    def close(self) -> None:
        """Stop beating; mark this rank done (a clean exit, not a hang) or failed (an uncaught exception)."""
        self.stop.set()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout=5.0)
        exc = getattr(sys, "last_value", None)  # set when the interpreter reported an uncaught exception
        if exc is not None and not isinstance(exc, (SystemExit, KeyboardInterrupt)):
            first = str(exc).splitlines()[0][:160] if str(exc) else ""
            self._write(f"{FAILED} {type(exc).__name__}" + (f": {first}" if first else "") + "\n")
        else:
            self._write(DONE + "\n")


_current: Heartbeat | None = None


def start(rank: int, world: int) -> Heartbeat | None:
    """Start this process's heartbeat once (no-op without ``heartbeat_dir`` or with a timeout <= 0)."""
    global _current
    from rannc_cli.config import settings

    folder = str(settings.get("heartbeat_dir") or "").strip()
    timeout = hang_timeout()
    if _current is not None or not folder or timeout <= 0:
        return _current
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    _current = Heartbeat(Path(folder), rank, world, timeout).start()
    return _current
