"""Job management: `rannc jobs`, `rannc status JOB`, `rannc logs JOB`, `rannc cancel JOB`.

    list_jobs()                      # table of recent jobs (states refreshed from the scheduler)
    job_status("3f2a")               # each phase's state, predicted vs observed step time, failing rank
    show_logs("3f2a", rank=1, follow=True)
    cancel_job("3f2a")               # every phase still pending or running

Everything is read again from the job folder's job.yaml, so these work after the CLI restarts
and from another shell. Remote jobs (submitted with --host) are asked over SSH; their logs are
read over SFTP.
"""

from __future__ import annotations

import datetime as _dt
import re
import time
from pathlib import Path
from typing import Any

import typer

from rannc_cli.errors import RanncError
from rannc_cli.scheduler.backend import CANCELLED_BY_USER, Backend, get_backend
from rannc_cli.scheduler.records import FINAL, PHASES, JobRecord, all_jobs, find_job, now

# a Python exception, "error:" lines, and a crash (PYTHONFAULTHANDLER=1 in every rank's environment)
_ERROR_LINE = re.compile(r"^(\w+(\.\w+)*(Error|Exception|Interrupt)|Traceback \(most recent call last\)|error:|Fatal Python error:)")


# ---------------------------------------------------------------------- scheduler access
def open_for(rec: JobRecord):
    from rannc_cli.scheduler.transport import open_transport

    return open_transport(rec.host)


def backend_for(rec: JobRecord, transport) -> Backend:
    return get_backend(rec.backend, transport)


def refresh(rec: JobRecord, transport, backend: Backend) -> bool:
    """Ask the scheduler about every phase not known to be final; save the record when it changed."""
    before = repr(rec.data["phases"])
    phases = rec.data["phases"]
    base = rec.exec_dir
    for name in ("profile", "train"):
        ph = phases[name]
        if ph.get("state") in FINAL or not ph.get("scheduler_id"):
            continue
        st = backend.state(str(ph["scheduler_id"]), f"{base}/{name}")
        ph["state"] = st.state
        for key, value in (("exit_code", st.exit_code), ("reason", st.reason)):
            if value is not None:
                ph[key] = value
            else:
                ph.pop(key, None)
        if st.never and st.state == "PENDING":
            ph["never"] = True
        else:
            ph.pop("never", None)
        if st.restarts:
            ph["restarts"] = st.restarts
        if st.state in FINAL and not ph.get("ended"):
            ph["ended"] = now()
        if st.state == "RUNNING" and not ph.get("started"):
            ph["started"] = now()
    plan = phases["plan"]
    if plan.get("state") not in FINAL:
        if transport.exists(f"{base}/plan.yaml"):
            plan["state"] = "COMPLETED"
        elif phases["profile"].get("state") in ("FAILED", "CANCELLED", "TIMEOUT"):
            plan["state"] = "SKIPPED"
        elif phases["train"].get("state") == "RUNNING":
            plan["state"] = "RUNNING"
        elif phases["train"].get("state") in ("FAILED", "CANCELLED", "TIMEOUT"):
            plan["state"] = "FAILED" if phases["train"]["state"] == "FAILED" else phases["train"]["state"]
    if plan.get("state") == "COMPLETED" and rec.data.get("predicted_step_seconds") is None:
        text = transport.read_text(f"{base}/plan.yaml")
        if text:
            import yaml

            try:
                rec.data["predicted_step_seconds"] = (yaml.safe_load(text).get("predicted") or {}).get("step_seconds")
            except yaml.YAMLError:
                pass
    if phases["train"].get("state") == "FAILED" and "failure" not in rec.data:
        where = find_failure(rec, transport)
        if where:
            rec.data["failure"] = where
    changed = repr(rec.data["phases"]) != before
    if changed:
        rec.save()
    return changed


_LAUNCHER_VERDICT = re.compile(r"^rannc run: rank (\d+) (.*?)(?: \(see [^)]*\))?(?:; stopped or lost ranks .*)?$")
_WATCHER_VERDICT = re.compile(r"^error: rank (\d+) (stopped answering): (.*)$")
_SRUN_TASK = re.compile(r"^srun: error: (\S+): tasks? (\d+)(?:-\d+)?: (.*)$")
_LOST_CONTACT = "lost contact with the other ranks"


def find_failure(rec: JobRecord, transport) -> str | None:
    """``train/rank-1.log:17: ValueError: boom``: where the rank to blame failed, and its last error line.

    The rank to blame is the one that failed or stopped answering first: the one `rannc run`'s
    last line names (local jobs), else one a heartbeat watcher named ("error: rank K stopped
    answering"), else the first task srun reports ended (not with code 3), else the first rank log
    with an error of its own; a rank that only lost contact with the others is named only when
    nothing else is known."""
    base = rec.exec_dir
    for phase in ("train", "profile"):
        names = transport.listdir(f"{base}/{phase}")
        ranks = sorted((n for n in names if re.fullmatch(r"rank-\d+\.log", n)), key=lambda n: int(n[5:-4]))
        batches = sorted(n for n in names if n.startswith("batch"))
        texts = {n: (transport.read_text(f"{base}/{phase}/{n}") or "").splitlines() for n in ranks + batches}
        verdict = _verdict(texts, batches, ranks)
        if verdict is not None:
            rank, what = verdict
            own = _last_error(texts.get(f"rank-{rank}.log", []), skip_lost=True)
            if own is not None:
                return f"{phase}/rank-{rank}.log:{own[0] + 1}: {own[1]}"
            return f"{phase}/rank-{rank}.log: rank {rank} {what}"[:260]
        for skip_lost in (True, False):
            for name in ranks + batches:
                hit = _last_error(texts[name], skip_lost)
                if hit is not None:
                    return f"{phase}/{name}:{hit[0] + 1}: {hit[1]}"
    return None


def _verdict(texts: dict[str, list[str]], batches: list[str], ranks: list[str]) -> tuple[int, str] | None:
    for name in batches:
        for line in reversed(texts[name]):
            m = _LAUNCHER_VERDICT.match(line.strip())
            if m:
                return int(m.group(1)), m.group(2)
    for name in ranks:
        for line in texts[name]:
            m = _WATCHER_VERDICT.match(line.strip())
            if m:
                return int(m.group(1)), f"{m.group(2)} ({m.group(3).split(';')[0]})"
    for name in batches:  # srun's own account: the first task that ended, unless it only lost contact
        for line in texts[name]:
            m = _SRUN_TASK.match(line.strip())
            if m and m.group(3).strip() != "Exited with exit code 3":
                return int(m.group(2)), f"ended first: {m.group(3).strip()} on {m.group(1)} (srun)"
    return None


def _last_error(lines: list[str], skip_lost: bool) -> tuple[int, str] | None:
    hits = [i for i, line in enumerate(lines) if _ERROR_LINE.match(line.strip())
            and not line.strip().startswith("Traceback")
            and not (skip_lost and (_LOST_CONTACT in line or _WATCHER_VERDICT.match(line.strip())))]
    return (hits[-1], lines[hits[-1]].strip()[:200]) if hits else None


def wait_for(rec: JobRecord, transport, backend: Backend, quiet: bool = False, timeout: float | None = None) -> str:
    """Poll until the job ends; print each phase change; RanncError (exit non-zero) unless COMPLETED."""
    from rannc_cli.scheduler.submit import poll_seconds

    shown: dict[str, str] = {}
    start = time.monotonic()
    interval = poll_seconds()
    while True:
        refresh(rec, transport, backend)
        for name in PHASES:
            ph = rec.phase(name)
            st = ph.get("state", "NEW")
            seen = f"{st} ({ph['reason']})" if st == "PENDING" and ph.get("reason") else st
            if shown.get(name) != seen and st != "NEW":
                shown[name] = seen
                if not quiet:
                    typer.echo(f"{_stamp()} {name}: {seen}")
        if rec.phase("train").get("state") in FINAL:
            break
        stuck = next((n for n in PHASES if rec.phase(n).get("never")), None)
        if stuck:
            raise RanncError(f"job {rec.id}'s {stuck} phase can never start: {rec.phase(stuck).get('reason')}",
                             hint=f"ask for what the cluster offers (rannc topology), then rannc cancel {rec.id}")
        if timeout is not None and time.monotonic() - start > timeout:
            raise RanncError(f"job {rec.id} still {rec.state} after {timeout:.0f} s")
        time.sleep(interval)
    state = rec.state
    if state != "COMPLETED":
        where = rec.data.get("failure")
        why = rec.phase("train").get("reason") if state == "TIMEOUT" else None
        raise RanncError(f"job {rec.id} ended {state}" + (f" at {where}" if where else "") + (f": {why}" if why else ""),
                         hint=f"rannc logs {rec.id}" + (f" --rank {_rank_of(where)}" if where and "rank-" in where else ""))
    if not quiet:
        typer.echo(f"job {rec.id} COMPLETED; logs: rannc logs {rec.id}")
    return state


def _rank_of(where: str) -> str:
    m = re.search(r"rank-(\d+)\.log", where)
    return m.group(1) if m else "0"


def _stamp() -> str:
    return _dt.datetime.now().strftime("%H:%M:%S")


# ---------------------------------------------------------------------- jobs
def _elapsed(rec: JobRecord) -> str:
    try:
        start = _dt.datetime.fromisoformat(rec.data["created"])
    except (KeyError, ValueError):
        return "-"
    end_text = rec.phase("train").get("ended") or rec.phase("profile").get("ended") if rec.final else None
    end = _dt.datetime.fromisoformat(end_text) if end_text else _dt.datetime.now(_dt.timezone.utc)
    seconds = max(0, int((end - start).total_seconds()))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def refresh_all(records: list[JobRecord]) -> dict[str, str]:
    """Refresh every unfinished job, one connection per host; returns {job id: why it is stale}."""
    stale: dict[str, str] = {}
    by_host: dict[str | None, list[JobRecord]] = {}
    for rec in records:
        if not rec.final:
            by_host.setdefault(rec.host, []).append(rec)
    for host, recs in by_host.items():
        try:
            transport = open_for(recs[0])
        except RanncError as exc:
            for rec in recs:
                stale[rec.id] = exc.one_line()
            continue
        try:
            for rec in recs:
                try:
                    refresh(rec, transport, backend_for(rec, transport))
                except RanncError as exc:
                    stale[rec.id] = exc.one_line()
        finally:
            transport.close()
    return stale


def list_jobs(as_json: bool = False, limit: int = 20) -> None:
    records = all_jobs()[-limit:]
    stale = refresh_all(records)
    rows = []
    for rec in records:
        ids = "/".join(str(rec.phase(p).get("scheduler_id")) for p in ("profile", "train") if rec.phase(p).get("scheduler_id"))
        spec = rec.data.get("spec") or {}
        rows.append({"id": rec.id, "name": rec.name, "backend": rec.backend + (f"@{rec.host}" if rec.host else ""),
                     "scheduler_ids": ids, "state": rec.state + (" (stale)" if rec.id in stale else ""),
                     "nodes": f"{spec.get('nodes', '?')}x{spec.get('gpus', '?')}", "elapsed": _elapsed(rec),
                     "folder": str(rec.dir), **({"unreadable": rec.unreadable} if rec.unreadable else {})})
    if as_json:
        import json

        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no jobs yet (rannc submit train.py --nodes N --gpus G)")
        return
    from tabulate import tabulate

    typer.echo(tabulate([[r["id"], r["name"], r["backend"], r["scheduler_ids"], r["state"], r["nodes"], r["elapsed"]]
                         for r in rows], headers=["id", "name", "backend", "scheduler ids", "state", "nodes x gpus",
                                                  "elapsed"]))
    for jid, why in stale.items():
        typer.echo(f"note: job {jid}: state not refreshed ({why})")
    for rec in records:
        if rec.unreadable:
            typer.echo(f"note: job {rec.id}: {rec.unreadable}")


# ---------------------------------------------------------------------- status
def observed_step_seconds(rec: JobRecord, transport) -> tuple[float, int] | None:
    """Wall seconds per logged step of rank 0 (from the training start to the log's last write)."""
    base = rec.exec_dir
    start_text = transport.read_text(f"{base}/train/rannc-train-start")
    log = transport.read_text(f"{base}/train/rank-0.log")
    if not start_text or not log:
        return None
    steps = len(re.findall(r"^\s*step\s+\d+", log, flags=re.M | re.I))
    if steps < 2:
        return None
    res = transport.run(["stat", "-c", "%Y", f"{base}/train/rank-0.log"]) if transport.remote else None
    try:
        end = float(res.stdout.strip()) if res is not None else Path(f"{base}/train/rank-0.log").stat().st_mtime
        return (end - float(start_text.split()[0])) / steps, steps
    except (ValueError, OSError, IndexError):
        return None


def job_status(ref: str, as_json: bool = False) -> dict[str, Any]:
    rec = find_job(ref)
    with open_for(rec) as transport:
        refresh(rec, transport, backend_for(rec, transport))
        observed = observed_step_seconds(rec, transport)
    spec = rec.data.get("spec") or {}
    out = {"id": rec.id, "name": rec.name, "backend": rec.backend, "host": rec.host, "state": rec.state,
           "folder": str(rec.dir), "remote_folder": rec.data.get("remote_dir"),
           "nodes": spec.get("nodes"), "gpus": spec.get("gpus"),
           "phases": {p: dict(rec.phase(p)) for p in PHASES},
           "predicted_step_seconds": rec.data.get("predicted_step_seconds"),
           "observed_step_seconds": observed[0] if observed else None,
           "failure": rec.data.get("failure")}
    if as_json:
        import json

        typer.echo(json.dumps(out, indent=2, default=str))
        return out
    from tabulate import tabulate

    typer.echo(f"job {rec.id} {rec.name}: {rec.state} ({rec.backend}{' on ' + rec.host if rec.host else ''}, "
               f"{spec.get('nodes')} node(s) x {spec.get('gpus')})")
    rows = []
    for p in PHASES:
        ph = rec.phase(p)
        detail = ph.get("reason") or ph.get("where") or ph.get("source") or ""
        if ph.get("never"):
            detail = f"can never start: {detail}"
        if ph.get("restarts"):
            detail = (detail + "; " if detail else "") + f"requeued {ph['restarts']}x"
        rows.append([p, ph.get("scheduler_id", "-"), ph.get("state", "NEW"),
                     "-" if ph.get("exit_code") is None else ph["exit_code"], detail])
    typer.echo(tabulate(rows, headers=["phase", "scheduler id", "state", "exit", "detail"]))
    pred = rec.data.get("predicted_step_seconds")
    line = f"step time: predicted {1e3 * pred:.4g} ms" if pred else "step time: predicted -"
    if observed:
        line += f", observed ~{1e3 * observed[0]:.4g} ms (rank 0 wall time per logged step, {observed[1]} steps, startup included)"
    typer.echo(line)
    if rec.data.get("failure"):
        typer.echo(f"failed at {rec.data['failure']}")
    typer.echo(f"folder: {rec.dir}" + (f" (remote {rec.host}:{rec.data.get('remote_dir')})" if rec.host else ""))
    return out


# ---------------------------------------------------------------------- logs
def _log_path(rec: JobRecord, transport, rank: int | None, phase: str | None) -> str:
    base = rec.exec_dir
    if phase in (None, "train") and (rank is not None or phase == "train" or
                                     transport.exists(f"{base}/train/rank-0.log")):
        return f"{base}/train/rank-{rank or 0}.log"
    phase = phase or "profile"
    names = [n for n in transport.listdir(f"{base}/{phase}") if n.startswith("batch")]
    return f"{base}/{phase}/{names[-1] if names else 'batch.log'}"


def show_logs(ref: str, rank: int | None = None, follow: bool = False, phase: str | None = None) -> None:
    from rannc_cli.scheduler.submit import poll_seconds

    if phase is not None and phase not in ("profile", "train"):
        raise RanncError(f"--phase {phase!r} is not one of profile, train")
    if rank is not None and rank < 0:
        raise RanncError(f"--rank must be >= 0 (got {rank})")
    rec = find_job(ref)
    spec = rec.data.get("spec") or {}
    world = int(spec.get("nodes", 1)) * int(spec.get("gpus", 1))
    if rank is not None and rank >= world:
        raise RanncError(f"job {rec.id} has ranks 0..{world - 1}; --rank {rank} does not exist")
    with open_for(rec) as transport:
        backend = backend_for(rec, transport)
        path = _log_path(rec, transport, rank, phase)
        offset = 0
        while True:
            got = transport.read_from(path, offset)
            if got is not None:
                text, offset = got
                if text:
                    typer.echo(text, nl=False)
            if not follow:
                if got is None:
                    raise RanncError(f"no log yet at {path}", hint=f"job {rec.id} is {rec.state}; try --follow")
                return
            refresh(rec, transport, backend)
            if rec.final:
                got = transport.read_from(path, offset)
                if got is not None and got[0]:
                    typer.echo(got[0], nl=False)
                return
            if got is None and rank is None and phase is None:
                path = _log_path(rec, transport, rank, phase)   # the training log appears once it starts
            time.sleep(min(1.0, poll_seconds()))


# ---------------------------------------------------------------------- cancel
def cancel_job(ref: str) -> JobRecord:
    rec = find_job(ref)
    cancelled = []
    with open_for(rec) as transport:
        backend = backend_for(rec, transport)
        refresh(rec, transport, backend)
        for name in ("train", "profile"):
            ph = rec.phase(name)
            if ph.get("state") in FINAL or not ph.get("scheduler_id"):
                continue
            phase_dir = f"{rec.exec_dir}/{name}"
            transport.write_text(f"{phase_dir}/{CANCELLED_BY_USER}", f"{now()}\n")
            backend.cancel(str(ph["scheduler_id"]))
            rec.set_phase(name, state="CANCELLED", reason="cancelled by rannc cancel", ended=now())
            cancelled.append(f"{name} {ph['scheduler_id']}")
        if rec.phase("plan").get("state") not in FINAL:
            rec.set_phase("plan", state="CANCELLED")
        rec.save()
    typer.echo(f"job {rec.id}: " + (f"cancelled {', '.join(cancelled)}" if cancelled else f"nothing to cancel ({rec.state})"))
    return rec
