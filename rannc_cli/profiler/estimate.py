"""Estimate a block's costs without running a kernel: FLOPs and bytes over a device spec.

    spec = load_device_spec("V100-SXM2-16GB")
    cost = estimate_block(stage, fake_inputs, microbatch=8, spec=spec)

Every ATen op of the forward and of the backward runs on fake tensors (shapes only). Its time is
``max(flops / (peak_flops[dtype] * efficiency_flops), bytes / (memory_bandwidth *
efficiency_memory)) + op_overhead_seconds``, where ``bytes`` are the op's input and output
tensors and ops that only create views cost nothing. Memory comes from the same tensor-size
accounting as measured CPU profiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from rannc_cli.errors import RanncError
from rannc_cli.paths import project_root
from rannc_cli.profiler.format import BlockCost
from rannc_cli.profiler.measure import BlockRun
from rannc_cli.profiler.memory import MemoryTracker, SavedTensorMeter, aliases_inputs, storage_key, tensors_in


@dataclass
class DeviceSpec:
    name: str
    peak_flops: dict[str, float]
    memory_bandwidth: float
    memory_bytes: int
    efficiency_flops: float = 0.6
    efficiency_memory: float = 0.8
    op_overhead_seconds: float = 5e-6
    extra: dict[str, Any] = field(default_factory=dict)

    def flops_rate(self, dtype: torch.dtype) -> float:
        key = str(dtype).replace("torch.", "")
        rate = self.peak_flops.get(key, self.peak_flops.get("float32"))
        if not rate:
            raise RanncError(f"device spec {self.name} has no peak_flops for {key}", hint="add it to configs/devices.yaml")
        return float(rate) * self.efficiency_flops

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "peak_flops": self.peak_flops, "memory_bandwidth": self.memory_bandwidth,
                "memory_bytes": self.memory_bytes, "efficiency_flops": self.efficiency_flops,
                "efficiency_memory": self.efficiency_memory, "op_overhead_seconds": self.op_overhead_seconds}


def devices_file() -> Path:
    return project_root() / "configs" / "devices.yaml"


def load_device_specs(path: Path | None = None) -> dict[str, DeviceSpec]:
    import yaml

    path = path or devices_file()
    data = yaml.safe_load(path.read_text()) or {}
    defaults = data.get("defaults", {})
    specs = {}
    for name, entry in (data.get("devices") or {}).items():
        merged = {**defaults, **entry}
        specs[name] = DeviceSpec(
            name=name,
            peak_flops={k: float(v) for k, v in merged["peak_flops"].items()},
            memory_bandwidth=float(merged["memory_bandwidth"]),
            memory_bytes=int(merged["memory_bytes"]),
            efficiency_flops=float(merged.get("efficiency_flops", 0.6)),
            efficiency_memory=float(merged.get("efficiency_memory", 0.8)),
            op_overhead_seconds=float(merged.get("op_overhead_seconds", 5e-6)),
        )
    return specs


def load_device_spec(name: str) -> DeviceSpec:
    specs = load_device_specs()
    if name in specs:
        return specs[name]
    lowered = {k.lower(): k for k in specs}
    matches = [k for k in specs if k.lower().startswith(name.lower())]
    if name.lower() in lowered:
        return specs[lowered[name.lower()]]
    if len(matches) == 1:
        return specs[matches[0]]
    raise RanncError(f"unknown device spec {name!r}",
                     hint=f"pick one of {', '.join(sorted(specs))} or add it to configs/devices.yaml")


class OpCostMode(TorchDispatchMode):
    """Adds up the roofline time and FLOPs of every op dispatched inside it."""

    def __init__(self, spec: DeviceSpec):
        super().__init__()
        self.spec = spec
        self.seconds = 0.0
        self.flops = 0.0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = tensors_in((args, kwargs))
        outs = tensors_in(out)
        if not outs and not ins:
            return out
        in_keys = {storage_key(t) for t in ins}
        new_outs = [] if aliases_inputs(func) else [t for t in outs if storage_key(t) not in in_keys]
        if not new_outs and func.overloadpacket not in flop_registry:
            return out  # a view or metadata op: no kernel
        nbytes = sum(t.numel() * t.element_size() for t in ins) + sum(t.numel() * t.element_size() for t in new_outs)
        flops = 0.0
        if func.overloadpacket in flop_registry:
            flops = float(flop_registry[func.overloadpacket](*args, **kwargs, out_val=out))
        dtype = (new_outs or outs or ins)[0].dtype
        seconds = max(flops / self.spec.flops_rate(dtype),
                      nbytes / (self.spec.memory_bandwidth * self.spec.efficiency_memory))
        self.seconds += seconds + self.spec.op_overhead_seconds
        self.flops += flops
        self.ops += 1
        return out


def estimate_block(stage: torch.nn.Module, fake_inputs: Sequence[Any], microbatch: int, spec: DeviceSpec,
                   fake_mode: Any) -> BlockCost:
    """Costs of one block from shapes only (run under ``fake_mode``)."""
    with fake_mode:
        run = BlockRun(stage, fake_inputs)
        exclude = list(stage.parameters()) + list(stage.buffers())
        with MemoryTracker() as mem:
            with SavedTensorMeter(exclude) as saved, OpCostMode(spec) as fwd:
                outs = run.forward()
            mem.keep_alive([o for o in outs if isinstance(o, torch.Tensor)])
            grad_outputs = run.grad_outputs(outs)
            with OpCostMode(spec) as bwd:
                grads = run.backward(outs, grad_outputs)
            mem.keep_alive([g for g in grads if isinstance(g, torch.Tensor)], until_end=True)
    return BlockCost(
        microbatch=microbatch,
        forward_seconds=fwd.seconds,
        backward_seconds=bwd.seconds,
        recompute_backward_seconds=fwd.seconds + bwd.seconds,
        activation_bytes=int(saved.bytes),
        peak_bytes=int(max(0, mem.peak_bytes() - saved.bytes)),
        flops_forward=fwd.flops,
        flops_backward=bwd.flops,
    )
