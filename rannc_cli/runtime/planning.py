"""Where a running job gets its plan: a plan file, explicit constraints, or rank 0's own search.

    c = Constraints.from_settings()                      # RANNC_PLAN, RANNC_STAGES, RANNC_REPLICAS, ...
    plan = obtain_plan(model, args, kwargs, bg, env, device, c)   # the same Plan on every rank

Order: a plan file (``plan=`` option or RANNC_PLAN) is used as is, refused when it was made for
another cluster shape (nodes x processes per node) or contradicts a forced stage count, replica
counts, microbatch count or schedule; otherwise rank 0 profiles the model on its first batch
(measured on CPU jobs, estimated from the GPU's spec on GPU jobs), runs the planner for this job's
shape with the forced stages, replicas, microbatches, schedule and checkpointing, asking for a plan
that gives every process work (replica counts must sum to the process count; when no such plan
fits, the plan says why GPUs stay idle), and broadcasts the plan. A failure on rank 0 is broadcast too, so
every rank stops with rank 0's error. ``even_plan`` splits blocks evenly by count, for tests and
for users who want a fixed layout without profiling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rannc_cli.errors import RanncError
from rannc_cli.planner.plan import Plan, StagePlan


@dataclass
class Constraints:
    plan: Any = None  # path, Plan or dict spec for even_plan
    stages: int | None = None
    replicas: list[int] | None = None
    microbatches: int | None = None
    schedule: str | None = None
    virtual_stages: int | None = None  # v chunks per GPU group (interleaved)
    zero: int | None = None  # ZeRO-1 on (1) or off (0)
    checkpoint: str = "auto"  # 'auto' (the plan's), 'on', 'off'
    quiet: bool = False  # no plan line on rank 0's stderr
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, **overrides: Any) -> "Constraints":
        from rannc_cli.config import settings

        def option(name: str) -> Any:  # a RaNNCModule option, checked by the registry's rule, else the setting
            return settings.value(name, overrides.pop(name, None) or None, f"RaNNCModule({name}={{}})")

        replicas = option("replicas") or None
        if isinstance(replicas, str):
            replicas = [int(x) for x in replicas.split(",")]
        out = cls(plan=overrides.pop("plan", None) or settings.get("plan") or None,
                  stages=option("stages") or None,
                  replicas=replicas,
                  microbatches=option("microbatches") or None,
                  schedule=option("schedule") or None,
                  virtual_stages=option("virtual_stages") or None,
                  zero=_zero_option(settings, overrides.pop("zero", None)),
                  checkpoint=str(option("checkpoint")),
                  quiet=bool(overrides.pop("quiet", False)))
        if out.replicas is not None:
            if out.stages is not None and out.stages != len(out.replicas):
                raise RanncError(f"{out.stages} stages but {len(out.replicas)} replica counts ({out.replicas})",
                                 hint="give one replica count per stage")
            out.stages = len(out.replicas)
        out.extra = overrides
        return out


def _zero_option(settings: Any, given: Any) -> int | None:
    """RaNNCModule(zero=0|1) or the ``zero`` setting; None when neither forces it (0 is a choice, not unset)."""
    value = str(settings.value("zero", None if given is None else str(int(given)), "RaNNCModule(zero={})"))
    return None if value == "" else int(value)


def even_plan(n_blocks: int, replicas: list[int], microbatches: int, batch_size: int, schedule: str = "1f1b",
              checkpoint: bool | list[bool] = False, bounds: list[int] | None = None, gpus_per_node: int = 1 << 20,
              first_rank: int = 0, virtual: int = 1) -> Plan:
    """Stages of (nearly) equal block counts, or cut at ``bounds``; replicas on consecutive ranks.
    With ``virtual`` v > 1 (schedule 'interleaved') ``replicas`` names the p device groups and the
    plan has p v stages, stage i on group i % p's devices."""
    groups = len(replicas)
    replicas = [replicas[i % groups] for i in range(groups * virtual)]
    n_stages = len(replicas)
    if bounds is None:
        if n_stages > n_blocks:
            raise RanncError(f"{n_stages} stages need at least {n_stages} blocks; the model has {n_blocks}")
        bounds = [round(i * n_blocks / n_stages) for i in range(1, n_stages)]
    cuts = [0, *bounds, n_blocks]
    flags = checkpoint if isinstance(checkpoint, list) else [bool(checkpoint)] * n_stages
    stages, rank = [], first_rank
    for i in range(n_stages):
        if i >= groups:
            devs = list(stages[i % groups].devices)
        else:
            devs = [divmod(r, gpus_per_node) for r in range(rank, rank + replicas[i])]
            rank += replicas[i]
        stages.append(StagePlan(cuts[i], cuts[i + 1], replicas[i], devs, bool(flags[i])))
    plan = Plan(schedule=schedule, microbatches=microbatches, batch_size=batch_size, stages=stages,
                virtual_stages=virtual)
    plan.validate(n_blocks, None, "even plan")
    return plan


def _plan_from_spec(spec: Any, n_blocks: int, batch_size: int, world_size: int, gpus_per_node: int,
                    c: "Constraints | None" = None) -> Plan:
    from rannc_cli.planner.forced import Forced
    from rannc_cli.planner.planfile import check_forced, check_shape, load_plan

    if isinstance(spec, Plan):
        plan = spec
    elif isinstance(spec, (str, Path)):
        plan = load_plan(spec)
        check_shape(plan, -(-world_size // max(1, gpus_per_node)), gpus_per_node, str(spec))
        if c is not None:
            check_forced(plan, Forced(c.stages, tuple(c.replicas) if c.replicas else None, c.microbatches,
                                      c.schedule, virtual=c.virtual_stages, zero=c.zero), str(spec))
    elif isinstance(spec, dict):
        replicas = list(spec.get("replicas") or [world_size])
        plan = even_plan(n_blocks, replicas, int(spec.get("microbatches", 1)), batch_size,
                         str(spec.get("schedule", "1f1b")), spec.get("checkpoint", False), spec.get("bounds"),
                         gpus_per_node, virtual=int(spec.get("virtual_stages", 1)))
        plan.zero = int(spec.get("zero", 0))
        plan.allreduce_overlap = bool(spec.get("allreduce_overlap", False))
    else:
        raise RanncError(f"plan= takes a plan file path, a Plan or a dict, not {type(spec).__name__}")
    if plan.stages[-1].end != n_blocks:
        raise RanncError(f"the plan covers {plan.stages[-1].end} blocks but this model has {n_blocks} (with this "
                         "batch shape and block_target)", hint="make a new plan for this model with `rannc plan`")
    return plan


def _search_on_rank0(model: Any, args: tuple, kwargs: dict, n_blocks: int, batch_size: int, env: Any, device: Any,
                     c: Constraints, estimate: bool = False) -> Plan:
    import torch

    from rannc_cli.config import settings
    from rannc_cli.planner.cluster import ClusterSpec, parse_size
    from rannc_cli.planner.planner import make_plan
    from rannc_cli.profiler.build import profile_model

    mode = str(settings.get("runtime_profile"))
    if mode == "auto":
        mode = "estimated" if device.type == "cuda" else "measured"
    if estimate:
        mode = "estimated"
    profile, _ = profile_model(model, args, kwargs, mode=mode)
    if len(profile.blocks) != n_blocks:
        raise RanncError(f"internal error: the profile has {len(profile.blocks)} blocks, the runtime {n_blocks}",
                         hint="please report this model")
    memory = settings.get("runtime_memory")
    if memory:
        mem = parse_size(memory)
    elif device.type == "cuda":
        mem = int(torch.cuda.get_device_properties(device).total_memory)
    else:
        from rannc_cli.profiler.build import device_description

        mem = max(1 << 30, int(device_description(device).get("memory_bytes", 0)) // max(1, env.local_world_size))
    cluster = ClusterSpec.from_flags(env.nodes, env.local_world_size, mem,
                                     gpu_model=torch.cuda.get_device_name(device) if device.type == "cuda" else "")
    report = make_plan(profile, cluster, batch_size=batch_size, stages=c.stages, replicas=c.replicas,
                       microbatches=c.microbatches, schedule=c.schedule, with_baselines=False,
                       virtual_stages=c.virtual_stages, zero=c.zero,
                       checkpoint=None if c.checkpoint == "auto" else c.checkpoint, all_devices=True)
    return report.plan


def obtain_plan(model: Any, args: tuple, kwargs: dict, n_blocks: int, batch_size: int, env: Any, device: Any,
                c: Constraints, estimate: bool = False) -> tuple[Plan, int]:
    """The plan every rank runs, and rank 0's RNG seed (see the module docstring)."""
    import torch
    import torch.distributed as dist

    from rannc_cli.planner.planfile import plan_from_dict, plan_to_dict

    gpus_per_node = env.local_world_size
    payload: dict[str, Any] = {}
    if env.rank == 0:
        try:
            if c.plan is not None:
                plan = _plan_from_spec(c.plan, n_blocks, batch_size, env.world_size, gpus_per_node, c)
            else:
                plan = _search_on_rank0(model, args, kwargs, n_blocks, batch_size, env, device, c, estimate)
            payload = {"plan": plan_to_dict(plan), "seed": int(torch.initial_seed() % (2 ** 62))}
        except RanncError as exc:
            payload = {"error": exc.message, "hint": exc.hint}
        except Exception as exc:  # noqa: BLE001 - every rank must hear about it
            payload = {"error": f"planning failed on rank 0: {type(exc).__name__}: {str(exc)[:300]}",
                       "hint": "please report it; RANNC_DEBUG=1 shows the traceback", "cause": exc}
    box = [payload]
    dist.broadcast_object_list(box, src=0)
    payload = box[0]
    if "error" in payload:
        raise RanncError(payload["error"], hint=payload.get("hint"), cause=payload.get("cause"))
    plan = plan_from_dict(payload["plan"], "the job's plan")
    plan.profile_hash = payload["plan"].get("profile_hash", "")
    if plan.stages[-1].end != n_blocks:
        raise RanncError(f"rank {env.rank} sees {n_blocks} blocks but the plan covers {plan.stages[-1].end}",
                         hint="every rank must run the same model on batches of the same shape")
    if c.checkpoint != "auto":
        for st in plan.stages:
            st.checkpoint = c.checkpoint == "on"
    return plan, int(payload["seed"])
