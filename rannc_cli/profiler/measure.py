"""Measure one block's forward/backward time and memory on the current device.

    cost = measure_block(stage, inputs, microbatch=8, warmup=2, repeats=5)

Times are medians of ``repeats`` timed runs after ``warmup`` untimed ones; CUDA runs are
synchronised around every timed region and use the caching allocator's peak statistics for
memory; CPU runs use wall time and tensor-size accounting (rannc_cli.profiler.memory).
Backward runs through ``torch.autograd.grad``, so nothing accumulates into ``.grad``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from rannc_cli.profiler.format import BlockCost
from rannc_cli.profiler.memory import MemoryTracker, SavedTensorMeter


class BlockRun:
    """Forward and backward of one stage module on fixed inputs."""

    def __init__(self, stage: torch.nn.Module, inputs: Sequence[Any]):
        self.stage = stage
        self.inputs = list(inputs)
        self.params = [p for p in stage.parameters() if p.requires_grad]
        self.targets = [x for x in self.inputs if isinstance(x, torch.Tensor) and x.requires_grad] + self.params
        self._grad_outputs: list[torch.Tensor] | None = None

    def forward(self) -> tuple:
        with torch.enable_grad():
            return self.stage(*self.inputs)

    def differentiable(self, outs: Sequence[Any]) -> list[torch.Tensor]:
        return [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]

    def grad_outputs(self, outs: Sequence[Any]) -> list[torch.Tensor]:
        if self._grad_outputs is None:
            self._grad_outputs = [torch.ones_like(o) for o in self.differentiable(outs)]
        return self._grad_outputs

    def backward(self, outs: Sequence[Any], grad_outputs: list[torch.Tensor]) -> tuple:
        diff = self.differentiable(outs)
        if not diff or not self.targets:
            return ()
        return torch.autograd.grad(diff, self.targets, grad_outputs, allow_unused=True)


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _device_of(run: BlockRun) -> torch.device:
    for t in run.targets + [x for x in run.inputs if isinstance(x, torch.Tensor)]:
        return t.device
    for b in run.stage.buffers():
        return b.device
    return torch.device("cpu")


def count_flops(run: BlockRun) -> tuple[float, float]:
    """(forward, backward) FLOPs from torch's FLOP counter."""
    with FlopCounterMode(display=False) as fwd_counter:
        outs = run.forward()
    grad_outputs = run.grad_outputs(outs)
    with FlopCounterMode(display=False) as bwd_counter:
        run.backward(outs, grad_outputs)
    return float(fwd_counter.get_total_flops()), float(bwd_counter.get_total_flops())


def measure_memory(run: BlockRun) -> tuple[int, int]:
    """(activation bytes saved for backward, transient peak bytes above them)."""
    device = _device_of(run)
    exclude = [p for p in run.stage.parameters()] + [b for b in run.stage.buffers()]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with SavedTensorMeter(exclude) as saved:
            outs = run.forward()
        grad_outputs = run.grad_outputs(outs)
        grads = run.backward(outs, grad_outputs)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del outs, grads
        return saved.bytes, max(0, peak - saved.bytes)
    with MemoryTracker() as mem:
        with SavedTensorMeter(exclude) as saved:
            outs = run.forward()
        mem.keep_alive([o for o in outs if isinstance(o, torch.Tensor)])
        grad_outputs = run.grad_outputs(outs)
        grads = run.backward(outs, grad_outputs)
        mem.keep_alive([g for g in grads if isinstance(g, torch.Tensor)], until_end=True)
    return saved.bytes, max(0, mem.peak_bytes() - saved.bytes)


def measure_block(stage: torch.nn.Module, inputs: Sequence[Any], microbatch: int, warmup: int = 2,
                  repeats: int = 5) -> BlockCost:
    """Time and memory of one block at one microbatch size (see the module docstring)."""
    run = BlockRun(stage, inputs)
    sync = _synchronizer(_device_of(run))
    for _ in range(max(0, warmup)):
        outs = run.forward()
        run.backward(outs, run.grad_outputs(outs))
    fwd, bwd, both = [], [], []
    for _ in range(max(1, repeats)):
        sync()
        t0 = time.perf_counter()
        outs = run.forward()
        sync()
        t1 = time.perf_counter()
        run.backward(outs, run.grad_outputs(outs))
        sync()
        t2 = time.perf_counter()
        del outs
        # activation checkpointing: the forward runs again right before its backward
        t3 = time.perf_counter()
        outs = run.forward()
        run.backward(outs, run.grad_outputs(outs))
        sync()
        t4 = time.perf_counter()
        del outs
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
        both.append(t4 - t3)
    activation, peak = measure_memory(run)
    flops_f, flops_b = count_flops(run)
    return BlockCost(
        microbatch=microbatch,
        forward_seconds=statistics.median(fwd),
        backward_seconds=statistics.median(bwd),
        recompute_backward_seconds=statistics.median(both),
        activation_bytes=int(activation),
        peak_bytes=int(peak),
        flops_forward=flops_f,
        flops_backward=flops_b,
    )
