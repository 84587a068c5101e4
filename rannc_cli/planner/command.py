"""`rannc plan`: load the profile and cluster, search, print the plan, write the files asked for.

    plan_command(profile=Path("prof.yaml"), nodes=4, gpus=8, mem_per_gpu="16GiB", out=Path("plan.yaml"))
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer

from rannc_cli.errors import RanncError
from rannc_cli.planner.cluster import ClusterSpec
from rannc_cli.planner.plan import Plan
from rannc_cli.planner.simulate import Simulation

GIB = float(1 << 30)


def _cluster(profile, nodes: int | None, gpus: int | None, mem_per_gpu: str | None, topology: Path | None) -> ClusterSpec:
    if topology is not None:
        return ClusterSpec.from_topology(topology, nodes, gpus, mem_per_gpu)
    if nodes is None or gpus is None:
        raise RanncError("say which cluster to plan for", hint="pass --nodes N --gpus G (and --mem-per-gpu), or --topology FILE")
    dev = profile.device
    on_gpu = dev.get("type") == "cuda"
    if mem_per_gpu is None:
        mem_per_gpu = int(dev["memory_bytes"]) if on_gpu and int(dev.get("memory_bytes") or 0) > 0 else "16GiB"
    # without a topology the profile's GPU (measured on, or the estimate's spec) is the plan's GPU model
    return ClusterSpec.from_flags(nodes, gpus, mem_per_gpu, gpu_model=str(dev.get("name") or "") if on_gpu else "")


def _parse_replicas(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RanncError(f"--replicas {text!r} must be a comma list of integers, e.g. 2,4,4") from None
    if not out or min(out) < 1:
        raise RanncError(f"--replicas {text!r} needs one count >= 1 per stage")
    return out


def _where(devices: list[tuple[int, int]]) -> str:
    by_node: dict[int, list[int]] = {}
    for n, g in devices:
        by_node.setdefault(n, []).append(g)
    parts = []
    for n, gs in by_node.items():
        gs = sorted(gs)
        parts.append(f"n{n}:g{gs[0]}" + (f"-{gs[-1]}" if len(gs) > 1 else ""))
    if len(parts) > 3:
        return f"{parts[0]} .. {parts[-1]} ({len(parts)} nodes)"
    return " ".join(parts)


def _names(profile, plan: Plan, i: int) -> str:
    st = plan.stages[i]
    first = profile.blocks[st.start].name or "<root>"
    last = profile.blocks[st.end - 1].name or "<root>"
    rng = f"{st.start}" if st.end - st.start == 1 else f"{st.start}-{st.end - 1}"
    return f"{rng} ({first})" if st.end - st.start == 1 else f"{rng} ({first} .. {last})"


def stage_rows(profile, plan: Plan, sim: Simulation, cm) -> list[list[Any]]:
    rows = []
    for i, st in enumerate(plan.stages):
        c = sim.costs[i]
        params = cm.range_info(st.start, st.end).param_bytes
        rows.append([i, _names(profile, plan, i), f"{params / GIB:.3g} GiB", f"{sim.memory[i] / GIB:.3g} GiB",
                     f"{1e3 * c.forward:.4g}", f"{1e3 * c.backward:.4g}", st.replicas, _where(st.devices),
                     "yes" if st.checkpoint else "no"])
    return rows


def plan_json(profile, report) -> dict[str, Any]:
    plan, sim = report.plan, report.simulation
    out: dict[str, Any] = {
        "stages": [{"blocks": st.blocks, "modules": _names(profile, plan, i), "replicas": st.replicas,
                    "devices": [[int(n), int(g)] for n, g in st.devices], "checkpoint": st.checkpoint,
                    "memory_bytes": int(sim.memory[i]), "forward_seconds": sim.costs[i].forward,
                    "backward_seconds": sim.costs[i].backward, "allreduce_seconds": sim.costs[i].allreduce,
                    "shard": sim.costs[i].shard} for i, st in enumerate(plan.stages)],
        "microbatches": plan.microbatches,
        "schedule": plan.schedule,
        "virtual_stages": plan.virtual_stages,
        "zero": plan.zero,
        "allreduce_overlap": plan.allreduce_overlap,
        "batch_size": plan.batch_size,
        "predicted_step_seconds": sim.step_seconds,
        "objective_seconds": sim.objective_seconds,
        "samples_per_second": plan.predicted.get("samples_per_second"),
        "baselines": {name: (b.simulation.step_seconds if b is not None else
                             getattr(report, "baseline_notes", {}).get(name, "infeasible"))
                      for name, b in report.baselines.items()},
        "idle_reason": plan.predicted.get("idle_reason", ""),
        "profile_hash": plan.profile_hash,
        "cluster_fingerprint": plan.cluster_fingerprint,
        "cluster": plan.cluster,
        "chosen_from": report.chosen_from,
        "search": {"optimality_gap": report.optimality_gap, "step_seconds": report.search_step_seconds, "seconds": report.search_seconds, "units": report.units, "dp_runs": report.dp_calls,
                   "exhaustive_plans": report.exhaustive_plans},
    }
    return out


def print_report(profile, report, explain_lines: list[str] | None) -> None:
    from tabulate import tabulate

    plan, sim, cm = report.plan, report.simulation, report.cost_model
    typer.echo(f"plan for {profile.model.get('name', '?')} ({len(profile.blocks)} blocks) on {cm.cluster.describe()}, "
               f"batch {plan.batch_size}")
    typer.echo(tabulate(stage_rows(profile, plan, sim, cm),
                        headers=["stage", "blocks (modules)", "params", "memory/GPU", "fwd ms", "bwd ms", "replicas",
                                 "placement", "ckpt"]))
    sps = plan.predicted.get("samples_per_second", math.nan)
    typer.echo(f"\npredicted step {1e3 * sim.step_seconds:.4g} ms, {sps:.4g} samples/s "
               f"({plan.schedule}" + (f" x{plan.virtual_stages} chunks per GPU group" if plan.virtual_stages > 1 else "")
               + (", ZeRO-1" if plan.zero else "") + (", all-reduce overlapped" if plan.allreduce_overlap else "")
               + f", {plan.microbatches} microbatches of {cm.microbatch(plan.microbatches)}, "
               f"{plan.devices_used} of {cm.cluster.devices} GPUs; usable memory {cm.capacity / GIB:.3g} GiB per GPU)")
    if plan.predicted.get("idle_reason"):
        typer.echo(plan.predicted["idle_reason"])
    if report.baselines:
        rows = []
        for name, b in report.baselines.items():
            if b is None:
                rows.append([name, getattr(report, "baseline_notes", {}).get(name, "infeasible (does not fit)"),
                             "-", "-", "-"])
                continue
            s = b.simulation.step_seconds
            reps = b.plan.stages[0].replicas
            rows.append([name, f"{len(b.plan.stages)} stage(s) x {reps}, M={b.plan.microbatches}", f"{1e3 * s:.4g}",
                         f"{plan.batch_size / s:.4g}", f"{s / sim.step_seconds:.3f}"])
        typer.echo("\n" + tabulate(rows, headers=["baseline", "configuration", "step ms", "samples/s", "vs plan"]))
    if report.chosen_from != "search":
        typer.echo(f"\nchosen from the {report.chosen_from} (the search's best simulated "
                   f"{1e3 * report.search_step_seconds:.4g} ms with {report.units} units; raise RANNC_PLANNER_MAX_UNITS "
                   "for finer stage boundaries)")
    if report.optimality_gap > 0:
        typer.echo(f"search stopped at its DP-run budget (RANNC_PLANNER_DP_BUDGET): the objective is within "
                   f"{report.optimality_gap:.1%} of the optimum over these units")
    how = (f"exhaustive over {report.exhaustive_plans} plans" if report.exhaustive_plans is not None
           else f"{report.dp_calls} DP runs")
    typer.echo(f"\nsearched {report.units} units in {report.search_seconds:.3g} s ({how})")
    if explain_lines:
        typer.echo("\n" + "\n".join(explain_lines))


def plan_command(profile: Path, nodes: int | None = None, gpus: int | None = None, mem_per_gpu: str | None = None,
                 batch_size: int | None = None, topology: Path | None = None, stages: int | None = None,
                 replicas: str | None = None, microbatches: int | None = None, schedule: str | None = None,
                 checkpoint: str | None = None, out: Path | None = None, virtual_stages: int | None = None,
                 zero: int | None = None, as_json: bool = False, timeline: Path | None = None, explain: bool = False,
                 exhaustive: bool = False, evaluate: Path | None = None) -> None:
    from rannc_cli.planner.planner import make_plan
    from rannc_cli.profiler.format import Profile

    if out is not None:
        from rannc_cli.fileio import data_format

        data_format(out)  # refuse a suffix we cannot write before the search
    prof = Profile.load(profile)
    cluster = _cluster(prof, nodes, gpus, mem_per_gpu, topology)
    from rannc_cli.planner.schedules import SCHEDULE_NAMES

    if schedule is not None and schedule not in SCHEDULE_NAMES:
        raise RanncError(f"--schedule {schedule!r} is not known", hint=f"use one of {', '.join(SCHEDULE_NAMES)}")
    if virtual_stages is not None and virtual_stages < 1:
        raise RanncError(f"--virtual-stages must be at least 1 (got {virtual_stages})")
    if virtual_stages is not None and virtual_stages > 1 and schedule not in (None, "interleaved"):
        raise RanncError(f"--virtual-stages {virtual_stages} needs the interleaved schedule, not --schedule {schedule}",
                         hint="drop --schedule or pass --schedule interleaved")
    if zero is not None and zero not in (0, 1):
        raise RanncError(f"--zero {zero} is not known", hint="use 0 (off) or 1 (ZeRO-1)")
    if batch_size is not None and batch_size < 1:
        raise RanncError(f"--batch-size must be at least 1 (got {batch_size})")
    if checkpoint is not None and checkpoint not in ("auto", "on", "off"):
        raise RanncError(f"--checkpoint {checkpoint!r} is not known", hint="use auto, on or off")
    if stages is not None and stages < 1:
        raise RanncError(f"--stages must be at least 1 (got {stages})")
    if microbatches is not None and microbatches < 1:
        raise RanncError(f"--microbatches must be at least 1 (got {microbatches})")
    if evaluate is not None:
        report = _evaluate(prof, cluster, evaluate)
    else:
        report = make_plan(prof, cluster, batch_size=batch_size, stages=stages, replicas=_parse_replicas(replicas),
                           microbatches=microbatches, schedule=schedule, use_exhaustive=exhaustive,
                           virtual_stages=virtual_stages, zero=zero,
                           checkpoint=None if checkpoint in (None, "auto") else checkpoint)
    lines = None
    if explain:
        from rannc_cli.planner.explain import explain as explain_fn

        lines = explain_fn(report)
    if out is not None:
        from rannc_cli.planner.planfile import save_plan

        save_plan(report.plan, out, [b.name for b in prof.blocks])
    if timeline is not None:
        from rannc_cli.planner.timeline import draw_timeline

        draw_timeline(report.plan, report.simulation, timeline)
    if as_json:
        data = plan_json(prof, report)
        if lines is not None:
            data["explain"] = lines
        typer.echo(json.dumps(data, indent=2))
    else:
        print_report(prof, report, lines)
        if out is not None:
            typer.echo(f"wrote {out}")
        if timeline is not None:
            typer.echo(f"wrote {timeline}")


def _evaluate(prof, cluster: ClusterSpec, path: Path):
    """Re-price an existing plan file on this profile and cluster (refusing a mismatched one)."""
    from rannc_cli.planner.baselines import evaluate_baselines
    from rannc_cli.planner.costmodel import CostModel
    from rannc_cli.planner.planfile import check_plan, load_plan
    from rannc_cli.planner.planner import PlanReport, annotate
    from rannc_cli.planner.search import SearchSpace
    from rannc_cli.planner.simulate import simulate

    plan = load_plan(path)
    check_plan(plan, prof.content_hash(), cluster.fingerprint, len(prof.blocks), cluster, str(path))
    cm = CostModel(prof, cluster, plan.batch_size)
    sim = simulate(plan, cm)
    over = [i for i, m in enumerate(sim.memory) if m > cm.capacity]
    if over:
        raise RanncError(f"{path}: stage {over[0]} needs {sim.memory[over[0]] / GIB:.3g} GiB per GPU, more than the "
                         f"{cm.capacity / GIB:.3g} GiB usable", hint="make a new plan with `rannc plan`")
    annotate(plan, sim, cm, prof)
    return PlanReport(plan, sim, cm, evaluate_baselines(cm, SearchSpace.build(cm).microbatches))
