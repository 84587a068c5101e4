"""Plan files (docs/plan-format.md): YAML, versioned, bound to one profile and one cluster shape.

    save_plan(plan, "plan.yaml")                                   # atomic
    plan = load_plan("plan.yaml")                                  # validated
    check_plan(plan, profile_hash=prof.content_hash(), cluster_fingerprint=spec.fingerprint,
               n_blocks=len(prof.blocks), cluster=spec)           # RanncError on any mismatch
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

from rannc_cli import __version__
from rannc_cli.errors import RanncError
from rannc_cli.fileio import read_yaml, write_data_atomic
from rannc_cli.planner.cluster import ClusterSpec
from rannc_cli.planner.plan import Plan, StagePlan

FORMAT_NAME = "rannc-plan"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)  # version 1 has no virtual_stages / zero / allreduce_overlap: their defaults


def plan_to_dict(plan: Plan, block_names: list[str] | None = None) -> dict[str, Any]:
    stages = []
    for i, st in enumerate(plan.stages):
        item: dict[str, Any] = {"blocks": st.blocks, "replicas": st.replicas,
                                "devices": [[int(n), int(g)] for n, g in st.devices], "checkpoint": bool(st.checkpoint)}
        if block_names:
            item["modules"] = f"{block_names[st.start] or '<root>'} .. {block_names[st.end - 1] or '<root>'}"
        pred = (plan.predicted.get("stages") or [])
        if i < len(pred):
            item.update(pred[i])
        stages.append(item)
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "created": plan.created or _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "rannc_version": __version__,
        "model": plan.model,
        "profile_hash": plan.profile_hash,
        "graph_hash": plan.graph_hash,
        "cluster_fingerprint": plan.cluster_fingerprint,
        "cluster": plan.cluster,
        "batch_size": plan.batch_size,
        "microbatches": plan.microbatches,
        "schedule": plan.schedule,
        "virtual_stages": int(plan.virtual_stages),
        "zero": int(plan.zero),
        "allreduce_overlap": bool(plan.allreduce_overlap),
        "stages": stages,
        "predicted": {k: v for k, v in plan.predicted.items() if k != "stages"},
    }


def save_plan(plan: Plan, path: Path | str, block_names: list[str] | None = None) -> Path:
    """Write the plan, YAML or JSON by the suffix (.yaml, .yml, .json), atomically."""
    header = ("# rannc plan (docs/plan-format.md). Devices are [node, gpu]; times in seconds, sizes in bytes.\n"
              "# The runtime refuses this plan for another profile (profile_hash) or cluster shape (cluster_fingerprint).\n")
    return write_data_atomic(path, plan_to_dict(plan, block_names), header, what="plan file")


def plan_from_dict(data: Any, source: str = "<plan>") -> Plan:
    hint = "pass a file written by `rannc plan --out`"
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise RanncError(f"{source} is not a rannc plan (no 'format: {FORMAT_NAME}')", hint=hint)
    if data.get("version") not in READ_VERSIONS:
        raise RanncError(f"{source} has plan format version {data.get('version')}, this rannc reads versions "
                         f"{', '.join(map(str, READ_VERSIONS))}", hint="re-run `rannc plan` with this rannc")
    try:
        stages = []
        for i, st in enumerate(data["stages"]):
            blocks = [int(b) for b in st["blocks"]]
            if not blocks or blocks != list(range(blocks[0], blocks[0] + len(blocks))):
                raise ValueError(f"stage {i} blocks must be a non-empty run of consecutive ids")
            stages.append(StagePlan(blocks[0], blocks[-1] + 1, int(st["replicas"]),
                                    [(int(d[0]), int(d[1])) for d in st["devices"]], bool(st.get("checkpoint", False))))
        plan = Plan(schedule=str(data["schedule"]), microbatches=int(data["microbatches"]),
                    batch_size=int(data["batch_size"]), stages=stages, profile_hash=str(data["profile_hash"]),
                    cluster_fingerprint=str(data["cluster_fingerprint"]), model=str(data.get("model", "")),
                    graph_hash=str(data.get("graph_hash", "") or ""),
                    cluster=dict(data.get("cluster") or {}), predicted=dict(data.get("predicted") or {}),
                    created=str(data.get("created", "")), virtual_stages=int(data.get("virtual_stages", 1)),
                    zero=int(data.get("zero", 0)), allreduce_overlap=_flag(data.get("allreduce_overlap", False)))
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise RanncError(f"{source} is a malformed rannc plan ({type(exc).__name__}: {exc})",
                         hint="compare it with docs/plan-format.md or re-run `rannc plan`") from None
    n_blocks = stages[-1].end if stages else 0
    plan.validate(n_blocks, None, source)
    return plan


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"allreduce_overlap must be true or false, not {value!r}")
    return value


def load_plan(path: Path | str) -> Plan:
    data = read_yaml(path, "plan file", "create one with `rannc plan --out FILE`")
    return plan_from_dict(data, str(path))


def check_shape(plan: Plan, nodes: int, gpus_per_node: int, source: str = "plan", hint: str | None = None) -> None:
    """Refuse a plan made for another cluster shape (nodes x GPUs per node) than this run's.

        check_shape(plan, nodes=1, gpus_per_node=4, source="plan.yaml")   # RanncError naming both shapes
    """
    shape = plan.cluster or {}
    made = (shape.get("nodes"), shape.get("gpus_per_node"))
    if None in made:  # a hand-made plan without a recorded shape: its devices must exist here
        world = nodes * gpus_per_node
        far = [d for st in plan.stages for d in st.devices if int(d[0]) * gpus_per_node + int(d[1]) >= world
               or int(d[1]) >= gpus_per_node]
        if far:
            raise RanncError(f"{source} places a replica on GPU {list(far[0])}, outside this run's {nodes} node(s) x "
                             f"{gpus_per_node} process(es)", hint=hint or "make a plan for this shape with `rannc plan`")
        return
    if (int(made[0]), int(made[1])) != (nodes, gpus_per_node):
        raise RanncError(f"{source} was made for {made[0]} node(s) x {made[1]} GPUs ({int(made[0]) * int(made[1])} "
                         f"processes); this run has {nodes} node(s) x {gpus_per_node} process(es)",
                         hint=hint or f"make a plan for this shape with `rannc plan --nodes {nodes} --gpus {gpus_per_node}`")


def check_forced(plan: Plan, forced, source: str = "plan") -> None:
    """Refuse forced parts (``forced.Forced``) that contradict a given plan file."""
    bad = forced.violations(plan)
    if bad:
        raise RanncError(f"{forced.flags()} contradicts {source} ({'; '.join(bad)})",
                         hint="drop those settings to run the plan as it is, or make a new plan with them")


def check_plan(plan: Plan, profile_hash: str, cluster_fingerprint: str, n_blocks: int, cluster: ClusterSpec | None = None,
               source: str = "plan") -> None:
    """Refuse a plan made for another model or cluster shape, with one clear line."""
    if plan.profile_hash != profile_hash:
        raise RanncError(f"{source} was made for another model (profile hash {plan.profile_hash or '?'}, "
                         f"model {plan.model or '?'}), not this profile ({profile_hash})",
                         hint="make a new plan with `rannc plan --profile PROFILE ...`")
    if plan.cluster_fingerprint != cluster_fingerprint:
        shape = plan.cluster
        made = (f"{shape.get('nodes')} x {shape.get('gpus_per_node')} GPUs of {shape.get('memory_per_gpu')} bytes"
                if shape else "another cluster")
        raise RanncError(f"{source} was made for {made} (fingerprint {plan.cluster_fingerprint}), not this cluster "
                         f"({cluster_fingerprint})", hint="make a new plan for this cluster with `rannc plan`")
    plan.validate(n_blocks, cluster, source)
