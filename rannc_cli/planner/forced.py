"""The parts of a plan the user forced, and the one check every returned plan passes.

    forced = Forced(stages=3, microbatches=4, checkpoint="on")
    forced.flags()                     # '--stages 3 --microbatches 4 --checkpoint on'
    forced.violations(plan, devices=8) # [] when the plan honours every forced part
    forced.conflicts(cm)               # RanncError when a forced part can never hold on this cluster and batch

Every step of the planner narrows its space with the same object: the search space
(search.SearchSpace.build), refinement and its deeper-pipeline splits (refine.Refiner), the
simulator's polish (which keeps the structure), the baselines, and the final choice
(planner.make_plan refuses to return a plan with violations). ``all_devices`` (the runtime's
in-process plan: every started process should get work) asks for plans that use every GPU:
forced replica counts must then sum to the GPU count, and when no plan on all of them fits,
make_plan returns the best plan that does with ``predicted['idle_reason']`` saying why.
``schedule`` may be any of schedules.SCHEDULE_NAMES; ``virtual`` (``--virtual-stages v``, v > 1
implies 'interleaved') and ``zero`` (``--zero 0|1``) fix those plan fields. With interleaving,
``stages`` and ``replicas`` count GPU groups (pipeline depth p), not the p v chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

from rannc_cli.errors import RanncError


@dataclass(frozen=True)
class Forced:
    stages: int | None = None
    replicas: tuple[int, ...] | None = None
    microbatches: int | None = None
    schedule: str | None = None
    checkpoint: str | None = None  # 'on' (every stage), 'off' (none), None (where a stage needs it)
    all_devices: bool = False
    virtual: int | None = None  # --virtual-stages v (v > 1: interleaved)
    zero: int | None = None  # --zero 0|1

    def __post_init__(self) -> None:
        from rannc_cli.planner.schedules import SCHEDULE_NAMES

        if self.schedule is not None and self.schedule not in SCHEDULE_NAMES:
            raise RanncError(f"--schedule {self.schedule!r} is not known", hint=f"use one of {', '.join(SCHEDULE_NAMES)}")
        if self.virtual is not None:
            if self.virtual < 1:
                raise RanncError(f"--virtual-stages must be at least 1 (got {self.virtual})")
            if self.virtual > 1 and self.schedule not in (None, "interleaved"):
                raise RanncError(f"--virtual-stages {self.virtual} needs the interleaved schedule, not --schedule "
                                 f"{self.schedule}", hint="drop --schedule or pass --schedule interleaved")
            if self.virtual > 1 and self.schedule is None:
                object.__setattr__(self, "schedule", "interleaved")
        if self.zero is not None and self.zero not in (0, 1):
            raise RanncError(f"--zero {self.zero} is not known", hint="use 0 (off) or 1 (ZeRO-1)")
        if self.replicas is not None:
            object.__setattr__(self, "replicas", tuple(int(r) for r in self.replicas))
            if self.stages is not None and self.stages != len(self.replicas):
                raise RanncError(f"--stages {self.stages} disagrees with --replicas ({len(self.replicas)} values)",
                                 hint="give one replica count per stage")
            object.__setattr__(self, "stages", len(self.replicas))
        if self.stages is not None and self.stages < 1:
            raise RanncError(f"--stages must be at least 1 (got {self.stages})")
        if self.microbatches is not None and self.microbatches < 1:
            raise RanncError(f"--microbatches must be at least 1 (got {self.microbatches})")
        if self.checkpoint not in (None, "on", "off"):
            raise RanncError(f"checkpoint {self.checkpoint!r} is not known", hint="use auto, on or off")

    @property
    def tie(self) -> float:
        """Bottleneck weight at one microbatch (costmodel.max_weight): stronger with a forced stage count."""
        from rannc_cli.planner.costmodel import FORCED_TIE_WEIGHT, TIE_WEIGHT

        return FORCED_TIE_WEIGHT if self.stages is not None else TIE_WEIGHT

    @property
    def shapes_plan(self) -> bool:
        """Whether any part of the plan itself is forced (the baselines' comparison is then narrowed)."""
        return any(x is not None for x in (self.stages, self.replicas, self.microbatches, self.schedule,
                                           self.checkpoint, self.virtual, self.zero))

    def flags(self) -> str:
        parts = []
        if self.replicas is not None:
            parts.append(f"--replicas {','.join(map(str, self.replicas))}")
        elif self.stages is not None:
            parts.append(f"--stages {self.stages}")
        for name in ("microbatches", "schedule", "checkpoint", "virtual", "zero"):
            if getattr(self, name) is not None:
                parts.append(f"--{'virtual-stages' if name == 'virtual' else name} {getattr(self, name)}")
        return " ".join(parts)

    def violations(self, plan, devices: int | None = None) -> list[str]:
        """What of the forced parts ``plan`` does not honour (empty when it honours all)."""
        out = []
        groups = getattr(plan, "groups", len(plan.stages))  # --stages and --replicas count GPU groups
        if self.stages is not None and groups != self.stages:
            out.append(f"{groups} stages, not {self.stages}")
        reps = tuple(st.replicas for st in plan.stages[:groups])
        if self.replicas is not None and reps != self.replicas:
            out.append(f"replicas {','.join(map(str, reps))}, not {','.join(map(str, self.replicas))}")
        if self.microbatches is not None and plan.microbatches != self.microbatches:
            out.append(f"{plan.microbatches} microbatches, not {self.microbatches}")
        if self.schedule is not None and plan.schedule != self.schedule:
            out.append(f"schedule {plan.schedule}, not {self.schedule}")
        v = getattr(plan, "virtual_stages", 1)
        if self.virtual is not None and v != self.virtual:
            out.append(f"{v} virtual stages, not {self.virtual}")
        if self.zero is not None and getattr(plan, "zero", 0) != self.zero:
            out.append(f"zero {getattr(plan, 'zero', 0)}, not {self.zero}")
        if self.checkpoint is not None and any(st.checkpoint != (self.checkpoint == "on") for st in plan.stages):
            out.append(f"checkpointing not {self.checkpoint} on every stage")
        if self.all_devices and devices is not None and sum(reps) != devices:
            out.append(f"{sum(reps)} of {devices} GPUs used")
        return out

    def conflicts(self, cm) -> None:
        """Refuse forced parts that no plan on ``cm``'s cluster and batch can honour, each with its cause."""
        devices, batch = cm.cluster.devices, cm.batch_size
        if self.microbatches is not None and self.microbatches > batch:
            raise RanncError(f"--microbatches {self.microbatches} is more than the batch of {batch} samples "
                             "(each microbatch needs at least one sample)",
                             hint=f"use at most {batch} microbatches or a larger batch")
        if self.stages is not None and self.stages > devices:
            raise RanncError(f"--stages {self.stages} needs at least {self.stages} GPUs (one per stage); "
                             f"{cm.cluster.describe()} has {devices}",
                             hint=f"use at most {devices} stages, or plan for more GPUs")
        if self.replicas is not None:
            if sum(self.replicas) > devices:
                raise RanncError(f"--replicas {','.join(map(str, self.replicas))} ask for {sum(self.replicas)} GPUs; "
                                 f"{cm.cluster.describe()} has {devices}",
                                 hint="lower the replica counts or plan for more GPUs")
            if self.all_devices and sum(self.replicas) != devices:
                raise RanncError(f"--replicas {','.join(map(str, self.replicas))} use {sum(self.replicas)} of the "
                                 f"{devices} processes; the other {devices - sum(self.replicas)} would stay idle",
                                 hint=f"give replica counts that sum to {devices}")
            widest = max(self.replicas)
            m = self.microbatches or 1
            if widest > cm.microbatch(m):
                raise RanncError(f"a stage with {widest} replicas needs microbatches of at least {widest} samples; "
                                 f"a batch of {batch} in {m} microbatch(es) gives {cm.microbatch(m)}",
                                 hint="use a larger batch, fewer microbatches or fewer replicas")
        if self.all_devices and self.replicas is None and self.stages is not None:
            m = self.microbatches or 1
            # each stage takes at most one replica per sample of a microbatch
            if self.stages * cm.microbatch(m) < devices:
                raise RanncError(f"{devices} processes cannot all get work with {self.stages} stage(s): a batch of "
                                 f"{batch} in {m} microbatch(es) feeds at most {cm.microbatch(m)} replicas per stage",
                                 hint="use a larger batch, fewer processes or more stages")
