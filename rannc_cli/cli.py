"""The `rannc` command line: a thin shell over the library.

    rannc profile examples/mlp.py --json

Each command parses its flags, calls one library function and prints. Heavy
imports (torch) happen inside the commands, so ``rannc --help`` stays instant.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from rannc_cli import __version__

app = typer.Typer(
    name="rannc",
    help="Train PyTorch models too large for one GPU: profile, plan and launch pipeline + data parallel jobs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rannc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """rannc: automatic pipeline + data parallel training for PyTorch on HPC clusters."""


# --------------------------------------------------------------------------- profile
@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def profile(
    ctx: typer.Context,
    script: Path = typer.Argument(..., help="Training script that wraps its model in RaNNCModule."),
    estimate: bool = typer.Option(False, "--estimate", help="Compute costs from FLOPs and bytes with a device spec; run no kernel."),
    device: str = typer.Option("cpu", "--device", help="Device to measure on: cpu or cuda."),
    device_spec: Optional[str] = typer.Option(None, "--device-spec", help="Device spec (configs/devices.yaml) for --estimate, e.g. V100-16GB."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Profile file to write (default: rannc-profile.yaml beside the script's working dir)."),
    microbatch_sizes: Optional[str] = typer.Option(None, "--microbatch-sizes", help="Comma list of microbatch sizes to measure (default: powers of two up to the batch, at most 4)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Ignore and do not update the profile cache."),
    as_json: bool = typer.Option(False, "--json", help="Print the profile summary as JSON."),
    top: int = typer.Option(10, "--top", help="Rows in the costliest-blocks table."),
) -> None:
    """Capture the model at its first forward, profile its blocks, write a profile file.

    Script arguments follow `--`: rannc profile train.py -- --lr 0.1
    """
    from rannc_cli.profiler.command import profile_command

    profile_command(
        script=script,
        script_args=list(ctx.args),
        estimate=estimate,
        device=device,
        device_spec=device_spec,
        out=out,
        microbatch_sizes=microbatch_sizes,
        use_cache=not no_cache,
        as_json=as_json,
        top=top,
    )


# --------------------------------------------------------------------------- plan
@app.command("plan")
def plan_cmd(
    profile: Path = typer.Option(..., "--profile", "-p", help="Profile file written by `rannc profile`."),
    nodes: Optional[int] = typer.Option(None, "--nodes", help="Nodes to plan for."),
    gpus: Optional[int] = typer.Option(None, "--gpus", help="GPUs per node."),
    mem_per_gpu: Optional[str] = typer.Option(None, "--mem-per-gpu", help="Memory per GPU, e.g. 16GiB (default: the topology's, the profiled GPU's, else 16GiB)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch size (default: the profiled batch)."),
    topology: Optional[Path] = typer.Option(None, "--topology", help="Topology file (`rannc topology --out`): nodes, GPUs and measured link costs."),
    stages: Optional[int] = typer.Option(None, "--stages", help="Force the number of pipeline stages."),
    replicas: Optional[str] = typer.Option(None, "--replicas", help="Force replicas per stage, e.g. 4,2,2 (implies --stages)."),
    microbatches: Optional[int] = typer.Option(None, "--microbatches", help="Force the number of microbatches."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="Force the schedule: 1f1b, gpipe, interleaved or zb."),
    virtual_stages: Optional[int] = typer.Option(None, "--virtual-stages", help="Force v model chunks per GPU group (v > 1: interleaved schedule)."),
    zero: Optional[int] = typer.Option(None, "--zero", help="Force ZeRO-1 (1: optimizer state sharded over each stage's replicas) or not (0)."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Force activation checkpointing: auto (where a stage needs it), on or off."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the plan file (docs/plan-format.md)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan, prediction and baselines as JSON."),
    timeline: Optional[Path] = typer.Option(None, "--timeline", help="Draw the simulated schedule to this PNG."),
    explain: bool = typer.Option(False, "--explain", help="List the next-best alternatives and why they lost."),
    exhaustive: bool = typer.Option(False, "--exhaustive", help="Price every plan (at most 12 blocks and 8 GPUs) instead of the DP; interleaved and zb plans are built from its best ones."),
    evaluate: Optional[Path] = typer.Option(None, "--evaluate", help="Re-price an existing plan file on this profile and cluster instead of searching."),
) -> None:
    """Search stage boundaries, replicas per stage, placement, microbatches and schedule for the fastest step."""
    from rannc_cli.planner.command import plan_command

    plan_command(profile=profile, nodes=nodes, gpus=gpus, mem_per_gpu=mem_per_gpu, batch_size=batch_size,
                 topology=topology, stages=stages, replicas=replicas, microbatches=microbatches, schedule=schedule,
                 virtual_stages=virtual_stages, zero=zero, checkpoint=checkpoint, out=out, as_json=as_json, timeline=timeline, explain=explain, exhaustive=exhaustive, evaluate=evaluate)


# --------------------------------------------------------------------------- run
@app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run_cmd(
    ctx: typer.Context,
    script: Path = typer.Argument(..., help="Training script that wraps its model in RaNNCModule."),
    nproc: int = typer.Option(..., "--nproc", "-n", help="Worker processes to start on this machine (one GPU each where there are GPUs)."),
    stages: Optional[int] = typer.Option(None, "--stages", help="Force the number of pipeline stages."),
    replicas: Optional[str] = typer.Option(None, "--replicas", help="Force replicas per stage, e.g. 2,1,1 (implies --stages)."),
    microbatches: Optional[int] = typer.Option(None, "--microbatches", help="Force the number of microbatches."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="Pipeline schedule: 1f1b (default), gpipe, interleaved or zb."),
    virtual_stages: Optional[int] = typer.Option(None, "--virtual-stages", help="Force v model chunks per GPU group (v > 1: interleaved schedule)."),
    zero: Optional[int] = typer.Option(None, "--zero", help="ZeRO-1: 1 shards the optimizer state over a stage's replicas, 0 does not."),
    plan: Optional[Path] = typer.Option(None, "--plan", help="Run this plan file (`rannc plan --out`) instead of planning at the first forward."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Activation checkpointing: auto (as planned), on or off."),
    log_dir: Optional[Path] = typer.Option(None, "--log-dir", help="Also write each rank's output to DIR/rank-<R>.log (only rank 0's reaches the terminal)."),
) -> None:
    """Run a training script in N local processes as one pipeline + data parallel job.

    Script arguments follow `--`: rannc run --nproc 4 train.py -- --lr 0.1
    """
    from rannc_cli.planner.command import _parse_replicas
    from rannc_cli.runtime.launcher import run_local

    code = run_local(script, list(ctx.args), nproc, stages=stages, replicas=_parse_replicas(replicas),
                     microbatches=microbatches, schedule=schedule, plan=plan, checkpoint=checkpoint,
                     log_dir=log_dir, virtual_stages=virtual_stages, zero=zero)
    raise typer.Exit(code)


# --------------------------------------------------------------------------- config
@app.command("config")
def config_cmd(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """List every setting: value, where it came from (env RANNC_<NAME>, config file, default), meaning."""
    from rannc_cli.config import settings

    rows = settings.table()
    if as_json:
        import json

        typer.echo(json.dumps({name: {"value": value, "source": source} for name, value, source, _ in rows}, indent=2))
        return
    from tabulate import tabulate

    typer.echo(tabulate(rows, headers=["setting", "value", "source", "meaning"]))


# --------------------------------------------------------------------------- topology
@app.command()
def topology(
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="slurm, pbs or local (default: the site's, else what works here)."),
    site: Optional[str] = typer.Option(None, "--site", help="Site config (configs/<NAME>.yaml or a path) that fills facts discovery cannot find."),
    host: Optional[str] = typer.Option(None, "--host", help="Discover over SSH: user@login.example[:port] or a ~/.ssh/config alias."),
    measure: bool = typer.Option(False, "--measure", help="Run a short job (2 nodes, or 1) timing p2p and all-reduce; store the numbers."),
    as_json: bool = typer.Option(False, "--json", help="Print the topology as JSON."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Topology file to write (default: rannc-topology.yaml)."),
    partition: Optional[str] = typer.Option(None, "--partition", "-p", help="Only nodes of this Slurm partition / PBS queue."),
    nodes: Optional[int] = typer.Option(None, "--nodes", "-N", min=1, help="Keep N usable nodes (site configs: make N nodes)."),
    measure_procs: Optional[int] = typer.Option(None, "--measure-procs", min=2, help="Processes per node for --measure (default: GPUs per node, 2 on CPU)."),
) -> None:
    """Discover the cluster (nodes, GPUs, interconnect), optionally measure links, write a topology file."""
    from rannc_cli.topology.command import topology_command

    topology_command(scheduler=scheduler, site=site, host=host, measure=measure, as_json=as_json, out=out,
                     partition=partition, nodes=nodes, measure_procs=measure_procs)


# --------------------------------------------------------------------------- submit
@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(
    ctx: typer.Context,
    script: Path = typer.Argument(..., help="Training script that wraps its model in RaNNCModule."),
    nodes: int = typer.Option(1, "--nodes", "-N", help="Nodes for the training job."),
    gpus: int = typer.Option(..., "--gpus", "-G", help="GPUs per node (local backend without GPUs: processes)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Batch system: slurm, pbs, ... or local (default: the site's, else the `scheduler` setting, else local)."),
    site: Optional[str] = typer.Option(None, "--site", help="Site config (configs/<NAME>.yaml or a path): queue, account form, modules, limits."),
    host: Optional[str] = typer.Option(None, "--host", help="Submit on a login node over SSH: user@login.example[:port] or a ~/.ssh/config alias."),
    time_limit: Optional[str] = typer.Option(None, "--time", "-t", help="Time limit, e.g. 2:00:00, 1-00:00:00, 90m."),
    queue: Optional[str] = typer.Option(None, "--queue", "-q", "--partition", help="Slurm partition / PBS queue (default: the site's)."),
    account: Optional[str] = typer.Option(None, "--account", "-A", help="Account (Slurm) or group (PBS group_list / -P)."),
    name: Optional[str] = typer.Option(None, "--name", help="Job name (default: the script's name)."),
    env: Optional[List[str]] = typer.Option(None, "--env", "-e", help="NAME=VALUE for every rank (repeatable)."),
    device: str = typer.Option("auto", "--device", help="Profile on: auto (CUDA when the node has it), cpu or cuda."),
    profile: Optional[Path] = typer.Option(None, "--profile", "-p", help="Use this profile file (skips the profiling job)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Profile again even when a matching profile is cached."),
    python: Optional[str] = typer.Option(None, "--python", help="Python on the cluster (default: this one; with --host the remote_python setting)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the job scripts, commands and plan summary; submit nothing."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the job to end; exit non-zero unless it COMPLETED."),
) -> None:
    """Profile, plan and train in one command: a profiling job, then the training job after it.

    Script arguments follow `--`: rannc submit train.py --nodes 2 --gpus 4 -- --lr 0.1
    """
    from rannc_cli.scheduler.submit import submit as submit_job

    submit_job(script=script, script_args=list(ctx.args), nodes=nodes, gpus=gpus, scheduler=scheduler, site=site,
               host=host, time_limit=time_limit, queue=queue, account=account, name=name, env=env, device=device,
               profile=profile, use_cache=not no_cache, dry_run=dry_run, wait=wait, python=python)


# --------------------------------------------------------------------------- jobs
@app.command("jobs")
def jobs_cmd(
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
    limit: int = typer.Option(20, "--limit", "-n", min=1, help="Most recent jobs to show."),
) -> None:
    """Recent jobs (from the logs folder): id, name, backend, state, nodes, elapsed."""
    from rannc_cli.scheduler.jobs import list_jobs

    list_jobs(as_json=as_json, limit=limit)


# --------------------------------------------------------------------------- status
@app.command("status")
def status_cmd(
    job: str = typer.Argument(..., help="Job id (or a prefix, the folder, or a scheduler job id)."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Each phase's state (profile, plan, train), predicted vs observed step time, the failing rank's line."""
    from rannc_cli.scheduler.jobs import job_status

    job_status(job, as_json=as_json)


# --------------------------------------------------------------------------- logs
@app.command("logs")
def logs_cmd(
    job: str = typer.Argument(..., help="Job id (or a prefix, the folder, or a scheduler job id)."),
    rank: Optional[int] = typer.Option(None, "--rank", "-r", help="Training rank whose log to show (default 0)."),
    phase: Optional[str] = typer.Option(None, "--phase", help="profile or train (default: train once it started)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends."),
) -> None:
    """Print a job's log: a training rank's, or the profiling job's."""
    from rannc_cli.scheduler.jobs import show_logs

    show_logs(job, rank=rank, follow=follow, phase=phase)


# --------------------------------------------------------------------------- cancel
@app.command("cancel")
def cancel_cmd(job: str = typer.Argument(..., help="Job id (or a prefix, the folder, or a scheduler job id).")) -> None:
    """Cancel every phase of a job that is still pending or running."""
    from rannc_cli.scheduler.jobs import cancel_job

    cancel_job(job)


def _only_help(argv: List[str]) -> bool:
    """`rannc`, `rannc --version`, `rannc plan --help`: answered whatever the settings say."""
    return not argv or any(a in ("-h", "--help", "--version") for a in argv[: argv.index("--") if "--" in argv else None])


def _command_typed(argv: List[str]) -> str:
    """``rannc plan`` for ``['plan', '-p', 'x']``: the sub-command the user named, for `--help` pointers."""
    names = {c.name or c.callback.__name__ for c in app.registered_commands if c.callback is not None}
    first = next((a for a in argv if not a.startswith("-")), "")
    return f"rannc {first}" if first in names else "rannc"


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point: run the app; every failure is one ``error:`` line and an exit code (docs/errors.md)."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        if not _only_help(args):
            from rannc_cli.config import settings

            settings.check_all()  # a misspelt or invalid RANNC_* variable is refused before anything runs
        code = app(args=args, prog_name="rannc", standalone_mode=False)
        from rannc_cli.failures import flush_stdout

        flush_stdout()
        if isinstance(code, int) and code:  # a command's typer.Exit(code), e.g. `rannc run`'s workers' code
            if code == 130:  # typer turns Ctrl-C into Exit(130)
                typer.echo("interrupted", err=True)
            return code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except BaseException as exc:  # noqa: BLE001 - the one place that turns any failure into one line
        if isinstance(exc, SystemExit):
            raise
        from rannc_cli.failures import report

        return report(exc, _command_typed(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
