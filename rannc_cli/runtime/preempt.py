"""Preemption and requeue: checkpoint on SIGUSR1, resume from RANNC_CHECKPOINT_DIR at the next start.

    watch = Preemption.install()          # RaNNCModule(...) does this when RANNC_CHECKPOINT_DIR is set
    found = latest_checkpoint(root)       # (step folder, manifest) of the last complete checkpoint, or None
    write_checkpoint(engine, root)        # collective: root/step-<k>/ + root/latest + root/rannc-preempted

The scheduler's job scripts forward SIGUSR1 to every rank before the time limit or a preemption
(docs/scheduler.md). The handler only sets a flag. Every step's loss all-reduce carries the flag,
so all ranks learn at the same step that some rank was signalled. After that step's
``optimizer.step()`` (the first one that really steps; without an optimizer: at the next training
forward) every rank writes its shard, rank 0 writes the manifest and points ``latest`` at the new
folder, older folders are removed, and the process exits with ``SystemExit(0)`` raised from
``optimizer.step()``: the training loop needs no change, and the job script sees every rank exit 0
with ``rannc-preempted`` written, so it requeues the job.

At the next start, RaNNCModule finds ``latest`` (a folder is complete once ``latest`` names it:
the manifest is written after every shard, behind a barrier). With the same world size and plan the
shards load exactly; otherwise every rank assembles the full single-device state from all shards
and loads its part into the new plan (a changed node count). The script's loop then runs again
from its first batch: the first k training forwards (k = steps already trained) are *replayed*:
they return the recorded loss without computing, their ``backward`` adds nothing and their
``optimizer.step()`` does nothing, while the script's own data pipeline, RNG draws, learning-rate
schedulers and prints advance exactly as in the first run. Step k+1 then trains on the batch the
uninterrupted run would have used, from the same parameters, optimizer state and dropout streams.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from rannc_cli.errors import RanncError
from rannc_cli.fileio import fsync_path, write_text_atomic

LATEST = "latest"
PARTIAL = ".partial"
MANIFEST = "manifest.json"
PREEMPTED = "rannc-preempted"


def checkpoint_root() -> Path | None:
    """RANNC_CHECKPOINT_DIR (the `checkpoint_dir` setting), or None."""
    from rannc_cli.config import settings

    value = str(settings.get("checkpoint_dir") or "").strip()
    return Path(value) if value else None


class Preemption:
    """SIGUSR1 sets ``requested``; the engine turns it into a checkpoint at a step boundary."""

    _installed: "Preemption | None" = None

    def __init__(self) -> None:
        self.requested = False

    @classmethod
    def install(cls) -> "Preemption":
        if cls._installed is not None:
            return cls._installed
        watch = cls()

        def handler(signum, frame):  # noqa: ARG001
            if not watch.requested:
                print(f"rannc: rank {os.environ.get('RANK', '0')}: SIGUSR1, checkpointing at the end of this step",
                      file=sys.stderr, flush=True)
            watch.requested = True

        try:
            signal.signal(signal.SIGUSR1, handler)
        except ValueError:  # not the main thread: leave the default action
            pass
        cls._installed = watch
        return watch


def latest_checkpoint(root: Path | None) -> tuple[Path, dict[str, Any]] | None:
    """The complete checkpoint ``root/latest`` names, or None when there is none.

    Incomplete folders (a save cut short: ``.step-<k>.partial``, or a step folder without a
    manifest) are never resumed from; rank 0 names them in one line. A shard whose size differs
    from the one the manifest recorded (truncated) is one error line."""
    if root is None:
        return None
    found = None
    if (root / LATEST).is_file():
        folder = root / (root / LATEST).read_text().strip()
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise RanncError(f"checkpoint {folder} named by {root / LATEST} is unreadable ({exc})",
                             hint=f"remove {root / LATEST} to start afresh, or restore the folder") from None
        if manifest.get("format") != "rannc-checkpoint":
            raise RanncError(f"{folder / MANIFEST} is not a rannc checkpoint manifest")
        for name, size in (manifest.get("shards") or {}).items():
            have = (folder / name).stat().st_size if (folder / name).is_file() else None
            if have != size:
                raise RanncError(f"checkpoint {folder} is damaged: {name} " +
                                 ("is missing" if have is None else f"has {have} bytes, the manifest says {size}"),
                                 hint=f"restore the folder, or remove {root / LATEST} to start afresh")
        found = folder, manifest
    incomplete = [p for p in incomplete_checkpoints(root) if found is None or p != found[0]]
    if incomplete and os.environ.get("RANK", "0") == "0":
        print(f"rannc: ignoring incomplete checkpoint folder(s) {', '.join(str(p) for p in incomplete)} "
              f"(a save was cut short; the next checkpoint removes them)", file=sys.stderr, flush=True)
    return found


def incomplete_checkpoints(root: Path) -> list[Path]:
    """Folders under ``root`` a save left unfinished: ``.step-<k>.partial`` and step folders without a manifest."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (
        (p.name.startswith(".step-") and p.name.endswith(PARTIAL)) or
        (p.name.startswith("step-") and not (p / MANIFEST).is_file())))


def write_checkpoint(engine: Any, root: Path, preempted: bool = True) -> Path:
    """Collective: shards of step ``engine.step`` into root/step-<k>, then ``latest`` and the marker.

    The shards go to ``root/.step-<k>.partial`` first; rank 0 writes the manifest (with every
    shard's size), flushes the folder to disk and renames it to ``step-<k>``; only then does
    ``latest`` name it. Leftovers of an earlier save cut short are removed first."""
    import torch.distributed as dist

    from rannc_cli.runtime.checkpoint import plan_key, save_shards

    folder = root / f"step-{engine.step}"
    partial = root / f".{folder.name}{PARTIAL}"
    if engine.rank == 0:
        for old in incomplete_checkpoints(root):
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()  # nobody writes into a folder rank 0 is still removing
    save_shards(engine, partial)  # ends with a barrier: every shard is on disk
    if engine.rank == 0:
        manifest = {"format": "rannc-checkpoint", "step": engine.step, "world_size": engine.world,
                    "local_world_size": engine.env.local_world_size, "plan_key": plan_key(engine.plan),
                    "shards": {p.name: p.stat().st_size for p in sorted(partial.glob("rank-*.pt"))}}
        write_text_atomic(partial / MANIFEST, json.dumps(manifest))
        if folder.exists():  # a checkpoint of this very step already exists: move it aside, removed below
            os.replace(folder, root / f".{folder.name}.replaced{PARTIAL}")
        os.replace(partial, folder)
        fsync_path(root)
        write_text_atomic(root / LATEST, folder.name + "\n")
        for old in [*root.glob("step-*"), *incomplete_checkpoints(root)]:
            if old.is_dir() and old.name != folder.name:
                shutil.rmtree(old, ignore_errors=True)
        if preempted:
            write_text_atomic(root / PREEMPTED, f"{engine.step}\n")
    dist.barrier()
    return folder
