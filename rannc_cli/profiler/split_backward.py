"""The zero-bubble ('zb') split of a block's backward: B (input gradients) and W (weight gradients).

    cost = with_measured_split(cost, stage, inputs, warmup=2, repeats=5)      # measured mode
    cost = with_estimated_split(cost, stage, fake_inputs, spec, fake_mode)   # estimate mode
    cost.backward_input_seconds, cost.backward_weight_seconds

Measured: the block's backward runs the way the runtime's 'zb' path runs it
(rannc_cli.runtime.split_backward.split_backward with the stage's parameters and the inputs that
require grad, then ``WeightGrad.run()``, which accumulates into ``.grad``), and B and W are timed
separately, each repetition right after a plain backward (``torch.autograd.grad`` to inputs and
parameters, as measure.py times it, keeping the graph) of the same forward: up to ``repeats``
timed repetitions (at most 3) after one untimed split (the plain path is warm from measure.py),
cut short after ``budget_seconds`` of timed work or once they agree within 3% (as measure.py). The
result is the plain backward the profile already holds (``backward_seconds``) times the medians
of the per-repetition ratios B / plain and W / plain: the ratio is measured under the same load
as its plain reference, so a load change between measure.py's timing and this one does not leak
into the split (on the shared 2-core CI machine a class's W once came out 2.6x its plain
backward when timed on its own). The parameters' ``.grad`` are restored afterwards. B + W may
exceed the plain backward: the split walks the autograd graph, keeps it, and starts one backward
call per parameter group (1.0-1.2x on CPU for the big Transformer blocks of
benchmarks/schedule_bench.py, up to 2x for tiny ones).

Estimated (no kernel runs): B is the roofline time (estimate.OpCostMode) of the ops a backward
to the block's inputs alone dispatches, W the rest of the block's plain backward
(``backward_seconds - B``, at least 0); a block with no input that requires grad has B = 0,
W = the whole backward, as in the runtime. The estimate prices the same kernels as a plain
backward, so B + W equals it: the split's per-call overhead is not modelled.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch

from rannc_cli.profiler.format import BlockCost
from rannc_cli.profiler.measure import STEADY_RUNS, STEADY_SPREAD, cuda_clock
from rannc_cli.runtime.split_backward import split_backward



class _SplitRun:
    """One block's forward and its split backward on fixed inputs."""

    def __init__(self, stage: torch.nn.Module, inputs: Sequence[Any]):
        self.stage = stage
        self.inputs = list(inputs)
        self.params = [p for p in stage.parameters() if p.requires_grad]
        self.wanted = [x if isinstance(x, torch.Tensor) and x.requires_grad else None for x in self.inputs]
        self._seeds: list[torch.Tensor] | None = None

    def forward(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The outputs that take part in the backward, and their gradients (ones)."""
        with torch.enable_grad():
            outs = self.stage(*self.inputs)
        diff = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
        if self._seeds is None:
            self._seeds = [torch.ones_like(o) for o in diff]
        return diff, self._seeds

    def device(self) -> torch.device:
        for t in self.params + [x for x in self.inputs if isinstance(x, torch.Tensor)]:
            return t.device
        return torch.device("cpu")


def _clock(device: torch.device) -> Callable[[Callable[[], Any]], tuple[float, Any]]:
    """``timed(fn) -> (seconds, result)``: wall time on CPU; on CUDA the kernels' time behind a GPU
    sleep (or the CPU's launch time where longer), as measure.py times the plain backward."""
    if device.type != "cuda":
        def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
            t0 = time.perf_counter()
            result = fn()
            return time.perf_counter() - t0, result
        return timed
    return cuda_clock()


def _steady(ps: list[float], bs: list[float], ws: list[float]) -> bool:
    """The last ``STEADY_RUNS`` repetitions' (B + W) / plain ratios agree within ``STEADY_SPREAD``."""
    ratios = [(b + w) / p for p, b, w in zip(ps, bs, ws) if p > 0][-STEADY_RUNS:]
    if len(ratios) < STEADY_RUNS:
        return False
    return max(ratios) - min(ratios) <= STEADY_SPREAD * statistics.median(ratios)


def measure_split(stage: torch.nn.Module, inputs: Sequence[Any], warmup: int = 2, repeats: int = 5,
                  budget_seconds: float = 1.0) -> tuple[list[float], list[float], list[float]]:
    """Per timed repetition: (plain backward, B, W) seconds of one block (see the module docstring).

    One forward per repetition: the plain backward keeps the graph and B and W then run on it.
    The block's plain path is already warm (measure.py ran it just before), so at most one
    untimed split runs first (none with ``warmup`` 0), and at most ``STEADY_RUNS`` (3) timed
    repetitions, fewer once they agree within ``STEADY_SPREAD`` or the budget is spent: the ratios
    are taken under the same load as their reference, and 5 repetitions made the split cost as
    much as all of measure.py's timing (1.1 s vs 1.0 s for examples/transformer_lm.py at
    microbatches 8 and 32).
    """
    run = _SplitRun(stage, inputs)
    timed = _clock(run.device())
    saved = [p.grad for p in run.params]
    targets = [x for x in run.wanted if x is not None] + run.params

    def once(plain_too: bool = True) -> tuple[float, float, float]:
        outs, seeds = run.forward()
        if not outs or not targets:
            return 0.0, 0.0, 0.0
        plain = 0.0
        if plain_too:
            plain, _ = timed(lambda: torch.autograd.grad(outs, targets, seeds, retain_graph=True, allow_unused=True))
        b, (_grads, weight) = timed(lambda: split_backward(outs, seeds, run.wanted, run.params))
        w, _ = timed(weight.run)
        return plain, b, w

    ps, bs, ws = [], [], []
    try:
        if warmup > 0:
            once(plain_too=False)
        for _ in range(max(1, min(repeats, STEADY_RUNS))):
            plain, b, w = once()
            ps.append(plain)
            bs.append(b)
            ws.append(w)
            if sum(ps) + sum(bs) + sum(ws) > budget_seconds or _steady(ps, bs, ws):
                break
    finally:
        for p, g in zip(run.params, saved):
            p.grad = g
    return ps, bs, ws


def with_measured_split(cost: BlockCost, stage: torch.nn.Module, inputs: Sequence[Any], warmup: int = 2,
                        repeats: int = 5, budget_seconds: float = 1.0) -> BlockCost:
    """``cost`` with ``backward_input_seconds`` / ``backward_weight_seconds`` measured: its
    ``backward_seconds`` times the median ratios B / plain and W / plain."""
    ps, bs, ws = measure_split(stage, inputs, warmup, repeats, budget_seconds)
    if not any(ps):  # nothing to differentiate: no backward to split
        return replace(cost, backward_input_seconds=0.0, backward_weight_seconds=0.0)
    b = statistics.median(x / p for x, p in zip(bs, ps) if p > 0)
    w = statistics.median(x / p for x, p in zip(ws, ps) if p > 0)
    return replace(cost, backward_input_seconds=b * cost.backward_seconds,
                   backward_weight_seconds=w * cost.backward_seconds)


def estimate_split(stage: torch.nn.Module, fake_inputs: Sequence[Any], backward_seconds: float, spec: Any,
                   fake_mode: Any) -> tuple[float, float]:
    """(B, W) seconds from shapes only: B = the roofline time of a backward to the inputs alone,
    W = ``backward_seconds - B`` (at least 0)."""
    from rannc_cli.profiler.estimate import OpCostMode

    with fake_mode:
        run = _SplitRun(stage, fake_inputs)
        wanted = [x for x in run.wanted if x is not None]
        outs, seeds = run.forward()
        if not outs:
            return 0.0, 0.0
        if not wanted:
            return 0.0, float(backward_seconds)
        with OpCostMode(spec) as ops:
            torch.autograd.grad(outs, wanted, seeds, allow_unused=True)
    b = min(ops.seconds, float(backward_seconds))
    return b, max(0.0, float(backward_seconds) - b)


def with_estimated_split(cost: BlockCost, stage: torch.nn.Module, fake_inputs: Sequence[Any], spec: Any,
                         fake_mode: Any) -> BlockCost:
    """``cost`` with ``backward_input_seconds`` / ``backward_weight_seconds`` estimated."""
    b, w = estimate_split(stage, fake_inputs, cost.backward_seconds, spec, fake_mode)
    return replace(cost, backward_input_seconds=b, backward_weight_seconds=w)
