"""Measure one block's forward/backward time and memory on the current device.

    cost = measure_block(stage, inputs, microbatch=8, warmup=2, repeats=5)

Times are medians of up to ``repeats`` timed runs after up to ``warmup`` untimed ones (both cut
short for blocks that take long: see ``budget_seconds``, and timing stops once ``STEADY_RUNS`` runs
agree within ``STEADY_SPREAD``); the memory and FLOP pass, a forward and backward itself, runs
first and counts as the first warm-up. CUDA runs time the kernels with CUDA
events behind a GPU sleep that hides launch latency (see ``_cuda_times``) and use the caching
allocator's peak statistics for memory; CPU runs use wall time and tensor-size accounting
(rannc_cli.profiler.memory).
Backward runs through ``torch.autograd.grad``, so nothing accumulates into ``.grad``.
"""

from __future__ import annotations

import contextlib
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


def measure_memory_and_flops(run: BlockRun) -> tuple[int, int, float, float]:
    """One forward+backward that reports (saved activation bytes, transient peak bytes above them,
    forward FLOPs, backward FLOPs)."""
    device = _device_of(run)
    exclude = [p for p in run.stage.parameters()] + [b for b in run.stage.buffers()]
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    mem = MemoryTracker() if not cuda else None
    with (mem if mem is not None else contextlib.nullcontext()):
        with SavedTensorMeter(exclude) as saved, FlopCounterMode(display=False) as fwd_counter:
            outs = run.forward()
        if mem is not None:
            mem.keep_alive([o for o in outs if isinstance(o, torch.Tensor)])
        grad_outputs = run.grad_outputs(outs)
        with FlopCounterMode(display=False) as bwd_counter:
            grads = run.backward(outs, grad_outputs)
        if mem is not None:
            mem.keep_alive([g for g in grads if isinstance(g, torch.Tensor)], until_end=True)
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = mem.peak_bytes()
    return (saved.bytes, max(0, peak - saved.bytes), float(fwd_counter.get_total_flops()),
            float(bwd_counter.get_total_flops()))


STEADY_RUNS = 3        # timing stops early once this many runs ...
STEADY_SPREAD = 0.03   # ... lie within this fraction of their median (forward + backward)


def _enough(fwd: list[float], bwd: list[float], budget_seconds: float) -> bool:
    """Stop timing: the budget is spent, or the runs so far agree (more would not move the median)."""
    if sum(fwd) + sum(bwd) > budget_seconds:
        return True
    if len(fwd) < STEADY_RUNS:
        return False
    totals = [f + b for f, b in zip(fwd, bwd)]
    return max(totals) - min(totals) <= STEADY_SPREAD * statistics.median(totals)


def _wall_times(run: BlockRun, repeats: int, budget_seconds: float) -> tuple[list[float], list[float]]:
    fwd, bwd = [], []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        outs = run.forward()
        t1 = time.perf_counter()
        run.backward(outs, run.grad_outputs(outs))
        t2 = time.perf_counter()
        del outs
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
        if _enough(fwd, bwd, budget_seconds):
            break
    return fwd, bwd


_GPU_HZ = 2.0e9  # an upper bound on GPU clocks, to turn seconds into torch.cuda._sleep cycles


def cuda_clock(hint: float = 0.0) -> Callable[[Callable[[], Any]], tuple[float, Any]]:
    """``timed = cuda_clock(); seconds, result = timed(fn)``: ``fn``'s kernels timed with CUDA
    events behind a GPU sleep long enough for the CPU to queue them (or the CPU's launch time
    where longer); ``hint`` seeds the launch time, which is learnt as regions run."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    launch = max(hint, 1e-4)  # seconds the CPU may need to queue a region; learnt as we go

    def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
        nonlocal launch
        torch.cuda._sleep(int(1.5 * launch * _GPU_HZ) + 100_000)
        start.record()
        t0 = time.perf_counter()
        result = fn()
        cpu = time.perf_counter() - t0
        end.record()
        end.synchronize()
        launch = max(launch, cpu)
        return max(start.elapsed_time(end) / 1e3, cpu), result
    return timed


def _cuda_times(run: BlockRun, repeats: int, budget_seconds: float, hint: float) -> tuple[list[float], list[float]]:
    """Forward and backward seconds as a training step sees them: the GPU's time, or the CPU's
    time to launch the kernels where that is longer.

    A training loop launches kernels ahead of the GPU, so a block's cost is its kernels' time, not
    launch latency plus a synchronisation. Each region therefore starts behind a GPU sleep long
    enough for the CPU to queue all of it, and CUDA events time the kernels alone; the CPU's own
    launch time is measured meanwhile. Timing every block with a synchronisation instead added
    28% to a BERT-class step on an H200 (benchmarks/README.md, GPU check)."""
    timed = cuda_clock(hint)
    fwd, bwd = [], []
    for _ in range(max(1, repeats)):
        f, outs = timed(run.forward)
        grad_outputs = run.grad_outputs(outs)
        b, _ = timed(lambda outs=outs: run.backward(outs, grad_outputs))
        del outs
        fwd.append(f)
        bwd.append(b)
        if _enough(fwd, bwd, budget_seconds):
            break
    return fwd, bwd


def measure_block(stage: torch.nn.Module, inputs: Sequence[Any], microbatch: int, warmup: int = 2,
                  repeats: int = 5, budget_seconds: float = 1.0) -> BlockCost:
    """Time and memory of one block at one microbatch size (see the module docstring).

    Timing stops early once ``budget_seconds`` of timed work has been spent (at least one run) or
    the runs agree (``_enough``), and warm-up stops once a single run takes half the budget: big
    blocks need few samples. The memory and FLOP pass runs first, as the first of the ``warmup`` runs.
    """
    run = BlockRun(stage, inputs)
    device = _device_of(run)
    sync = _synchronizer(device)
    activation, peak, flops_f, flops_b = measure_memory_and_flops(run)   # the first warm-up
    warm = 0.0
    for _ in range(max(0, warmup - 1)):
        t0 = time.perf_counter()
        outs = run.forward()
        run.backward(outs, run.grad_outputs(outs))
        sync()
        del outs
        warm = time.perf_counter() - t0
        if warm > budget_seconds / 2:
            break
    if device.type == "cuda":
        fwd, bwd = _cuda_times(run, repeats, budget_seconds, warm)
    else:
        fwd, bwd = _wall_times(run, repeats, budget_seconds)
    forward, backward = statistics.median(fwd), statistics.median(bwd)
    return BlockCost(
        microbatch=microbatch,
        forward_seconds=forward,
        backward_seconds=backward,
        # activation checkpointing runs the forward again right before the backward
        recompute_backward_seconds=forward + backward,
        activation_bytes=int(activation),
        peak_bytes=int(peak),
        flops_forward=flops_f,
        flops_backward=flops_b,
    )
