"""`rannc submit`: profile job -> plan -> training job, on Slurm, PBS or this machine.

    rec = submit(script=Path("train.py"), script_args=["--lr", "0.1"], nodes=2, gpus=4, scheduler="slurm")
    rec.dir      # logs/<timestamp>-train-<id>/: scripts, profile, plan, per-rank logs, job.yaml

The flow (docs/scheduler.md):
1. Resolve flags + site config into a JobSpec and check it against the cluster (enough nodes of
   that shape, time limit) before anything is submitted.
2. Profile: ``--profile FILE``, else a cached profile of the same script, arguments and target,
   else a one-node profiling job.
3. Plan: now, on this machine, when the profile is already here; otherwise at the start of the
   training job, for the nodes it was given.
4. Training job: N nodes x G ranks, depending on the profiling job (afterok).
"""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path
from typing import Any

import typer

from rannc_cli.errors import RanncError
from rannc_cli.fileio import copy_file_atomic, require_file, write_text_atomic
from rannc_cli.scheduler.backend import backend_class
from rannc_cli.scheduler.records import JobRecord, logs_dir
from rannc_cli.scheduler.spec import JobSpec, hms, resolve_spec, slurm_time, validate_against
from rannc_cli.scheduler.templates import render


# ---------------------------------------------------------------------- submission-level profile cache
def profile_cache_key(spec: JobSpec, script_path: Path) -> str:
    """What decides a profile before the model is captured: the script's bytes, its arguments, the target."""
    h = hashlib.sha256()
    h.update(script_path.read_bytes())
    h.update(json.dumps([spec.script_args, spec.device, spec.backend, spec.site, spec.host], sort_keys=True).encode())
    return h.hexdigest()[:20]


def _cache_path(key: str) -> Path:
    from rannc_cli.config import settings

    return Path(settings.get("cache_dir")).expanduser() / "submit-profiles" / f"{key}.yaml"


def cached_profile(key: str) -> Path | None:
    path = _cache_path(key)
    return path if path.is_file() else None


def store_cached_profile(key: str, profile: Path) -> None:
    copy_file_atomic(profile, _cache_path(key), what="profile cache entry")


# ---------------------------------------------------------------------- rendering
def render_scripts(spec: JobSpec, job_id: str, exec_dir: str, cache_key: str) -> dict[str, str]:
    """The job scripts of one job, rendered with the site's values; {file name: text}."""
    account_flag = "-P" if (spec.account_option or "").strip().startswith("-P") else "group_list"
    ctx: dict[str, Any] = {"spec": spec, "job_id": job_id, "job_dir": exec_dir, "cache_key": cache_key,
                           "slurm_time": slurm_time(spec.time_seconds) if spec.time_seconds else "",
                           "walltime": hms(spec.time_seconds) if spec.time_seconds else "",
                           "account_flag": account_flag, **backend_class(spec.backend).template_values(spec)}
    return {fname: render(spec.backend, f"{fname}.j2", {**ctx, "phase": "profile" if fname == "profile.sh" else "train"},
                          spec.templates_dir)
            for fname in backend_class(spec.backend).templates}


def submit_commands(spec: JobSpec, exec_dir: str, with_profile: bool, scripts: dict[str, str]) -> list[str]:
    """The scheduler commands submit() will run, for --dry-run."""
    B = backend_class(spec.backend)
    argv = [B.submit_argv(f"{exec_dir}/profile.sh", None, f"{exec_dir}/profile", scripts["profile.sh"])] \
        if with_profile else []
    argv.append(B.submit_argv(f"{exec_dir}/train.sh", "<profile job id>" if with_profile else None,
                              f"{exec_dir}/train", scripts["train.sh"]))
    return [shlex.join(a) for a in argv]


def _plan_here(job_dir: Path, spec: JobSpec, quiet: bool) -> dict[str, Any]:
    """Plan on this machine (the profile is here): write job_dir/plan.yaml, return its prediction."""
    import contextlib
    import io

    import yaml

    from rannc_cli.scheduler.phase import make_plan

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        make_plan(job_dir, spec.nodes, spec.gpus, spec.mem_per_gpu)
    if not quiet:
        typer.echo(buf.getvalue().rstrip())
    data = yaml.safe_load((job_dir / "plan.yaml").read_text())
    return data.get("predicted") or {}


# ---------------------------------------------------------------------- the flow
def submit(*, script: Path, script_args: list[str], nodes: int, gpus: int, scheduler: str | None = None,
           site: str | None = None, host: str | None = None, time_limit: str | None = None, queue: str | None = None,
           account: str | None = None, name: str | None = None, env: list[str] | None = None, device: str = "auto",
           profile: Path | None = None, use_cache: bool = True, dry_run: bool = False, wait: bool = False,
           python: str | None = None, quiet: bool = False) -> JobRecord | None:
    """Submit the job (see the module doc); returns its record (None for a dry run)."""
    from rannc_cli.config import settings
    from rannc_cli.scheduler.transport import open_transport

    spec = resolve_spec(script=script, script_args=script_args, nodes=nodes, gpus=gpus, scheduler=scheduler,
                        site=site, queue=queue, account=account, time=time_limit, name=name, env=env, device=device,
                        host=host, python=python)
    profile_notes: list[str] = []
    if profile is not None:
        from rannc_cli.profiler.origin import check_profile_script

        require_file(profile, "--profile", "pass a file written by `rannc profile --out`")
        profile_notes = check_profile_script(Path(profile), script)
    local_script = script.resolve()
    key = profile_cache_key(spec, local_script)
    have_profile = Path(profile) if profile else (cached_profile(key) if use_cache else None)
    echo = (lambda *_: None) if quiet else typer.echo

    transport = open_transport(host)
    rec = None
    try:
        notes: list[str] = list(profile_notes)
        B = backend_class(spec.backend)
        if dry_run and B.remote_ok and not transport.which(B.submit_command):
            notes.append(f"{spec.backend} commands not found on {transport.host}: the job was not checked against the cluster")
        elif dry_run:
            try:
                notes += validate_against(spec, transport)
            except RanncError as exc:
                notes.append(f"not checked against the cluster: {exc.one_line()}")
        else:
            notes += validate_against(spec, transport)
        rec = JobRecord.create(logs_dir(), spec.name, spec.backend, {}, host=transport.host if host else None,
                               make=False)
        if host:
            remote_base = str(settings.get("remote_dir")).rstrip("/")
            exec_dir = f"{remote_base}/{rec.dir.name}"
            if not dry_run:
                exec_dir = transport.mkdir_private(exec_dir)
            spec.script = f"{exec_dir}/src/{local_script.name}"
            spec.workdir = f"{exec_dir}/src"
            rec.data["remote_dir"] = exec_dir
        else:
            exec_dir = str(rec.dir)
        rec.data["spec"] = spec.to_dict()
        scripts = render_scripts(spec, rec.id, exec_dir, key)

        predicted: dict[str, Any] = {}
        if not dry_run:
            rec.make_dir()
        if have_profile is not None and not dry_run:
            copy_file_atomic(have_profile, rec.dir / "profile.yaml", what="job profile")
            predicted = _plan_here(rec.dir, spec, quiet=True)
        elif have_profile is not None and dry_run:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                copy_file_atomic(have_profile, Path(tmp) / "profile.yaml", what="job profile")
                predicted = _plan_here(Path(tmp), spec, quiet=True)
                plan_text = (Path(tmp) / "plan.yaml").read_text()
        if dry_run:
            for fname, text in scripts.items():
                echo(f"==> {exec_dir}/{fname} <==\n{text}")
            echo("==> commands <==")
            for line in submit_commands(spec, exec_dir, have_profile is None, scripts):
                echo(line)
            echo("==> plan <==")
            if have_profile is not None:
                echo(_plan_summary(plan_text))
            else:
                echo("made at the start of the training job from the profiling job's profile, for the nodes it gets")
            for note in notes:
                echo(f"note: {note}")
            echo(f"dry run: nothing submitted ({spec.summary()})")
            return None

        for fname, text in scripts.items():
            write_text_atomic(rec.dir / fname, text, mode=0o700, what="job script")
        for phase in ("profile", "train"):
            (rec.dir / phase).mkdir(mode=0o700, exist_ok=True)
        if host:
            for sub in ("profile", "train", "src", "checkpoints"):
                transport.mkdir_private(f"{exec_dir}/{sub}")
            for fname, text in scripts.items():
                transport.write_text(f"{exec_dir}/{fname}", text, 0o700)
            transport.write_text(spec.script, local_script.read_text(), 0o600)
            for fname in ("profile.yaml", "plan.yaml"):
                if (rec.dir / fname).is_file():
                    transport.write_text(f"{exec_dir}/{fname}", (rec.dir / fname).read_text(), 0o600)

        backend = B.for_spec(transport, spec)
        profile_id = None
        if have_profile is None:
            profile_id = backend.submit(f"{exec_dir}/profile.sh", None, f"{exec_dir}/profile")
            rec.set_phase("profile", scheduler_id=profile_id, state="PENDING", submitted=_now())
            rec.set_phase("plan", state="PENDING", where="start of the training job")
        else:
            rec.set_phase("profile", state="COMPLETED", source=str(have_profile) if profile else "cache")
            rec.set_phase("plan", state="COMPLETED", where="submit host")
            rec.data["predicted_step_seconds"] = predicted.get("step_seconds")
        rec.save()
        try:
            train_id = backend.submit(f"{exec_dir}/train.sh", profile_id, f"{exec_dir}/train")
        except RanncError:
            if profile_id is not None:   # do not leave a lone profiling job behind
                try:
                    backend.cancel(profile_id)
                except RanncError:
                    pass
                rec.set_phase("profile", state="CANCELLED", reason="the training job could not be submitted")
                rec.save()
            raise
        rec.set_phase("train", scheduler_id=train_id, state="PENDING", submitted=_now())
        rec.save()
        if host:
            transport.write_text(f"{exec_dir}/job.yaml", (rec.dir / "job.yaml").read_text(), 0o600)
        ids = (f"profile {profile_id}, " if profile_id else "profile cached, plan made here, ") + f"train {train_id}"
        echo(f"submitted job {rec.id} ({spec.summary()}): {ids}")
        echo(f"folder {_rel(rec.dir)}" + (f" (remote {transport.host}:{exec_dir})" if host else ""))
        for note in notes:
            echo(f"note: {note}")
        if wait:
            from rannc_cli.scheduler.jobs import wait_for

            wait_for(rec, transport, backend, quiet=quiet)
        return rec
    except BaseException:
        _discard_if_unsubmitted(rec, dry_run)
        raise
    finally:
        transport.close()


def _discard_if_unsubmitted(rec: JobRecord | None, dry_run: bool) -> None:
    """A submission that failed before any scheduler took a job leaves no half-made job folder."""
    if rec is None or dry_run or any(ph.get("scheduler_id") for ph in rec.data["phases"].values()):
        return
    import shutil

    shutil.rmtree(rec.dir, ignore_errors=True)


def _plan_summary(plan_text: str) -> str:
    import yaml

    data = yaml.safe_load(plan_text)
    stages = data.get("stages") or []
    reps = ",".join(str(s.get("replicas")) for s in stages)
    step = (data.get("predicted") or {}).get("step_seconds")
    return (f"{len(stages)} stage(s), replicas {reps}, {data.get('microbatches')} microbatches ({data.get('schedule')}), "
            f"batch {data.get('batch_size')}" + (f", predicted step {1e3 * step:.4g} ms" if step else ""))


def _now() -> str:
    from rannc_cli.scheduler.records import now

    return now()


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def poll_seconds() -> float:
    from rannc_cli.config import settings

    return float(settings.get("poll_seconds"))


