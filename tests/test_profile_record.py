"""The profiler's op-by-op pass that records the profiled blocks' inputs.

Only the first block of each class is profiled; the pass computes just those blocks (and the
parameter-only ops they read) and lets every other block's outputs be its class's first block's.
These tests check that: inputs of blocks whose producers are all computed equal the full pass's
bit for bit, every other input has the full pass's shape, dtype and requires_grad, the ops run do
not grow with depth, and graphs with data-dependent sizes run every op.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import load_example
from rannc_cli.graph.blocks import build_blocks
from rannc_cli.graph.capture import capture
from rannc_cli.graph.stages import build_block_stages
from rannc_cli.profiler import build as profiler_build
from zoo import ZOO


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _transformer(layers: int):
    ex = load_example("transformer_lm")
    torch.manual_seed(0)
    tokens, targets, padding = next(ex.batches(1, 4, 8, 64, 0))
    return ex.TransformerLM(vocab=64, d_model=16, heads=2, layers=layers, seq_len=8), (tokens, targets), \
        {"padding": padding}


def _setup(model, args, kwargs, size: int):
    for m in model.modules():  # dropout draws depend on which ops ran before; compare without it
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        elif isinstance(m, nn.MultiheadAttention):
            m.dropout = 0.0
    bg = build_blocks(capture(model, args, kwargs))
    first = {members[0] for members in bg.classes}
    stages = build_block_stages(bg, first)
    values = profiler_build.slice_inputs(bg.captured, bg.captured.flatten_inputs(args, kwargs), size)
    return bg, first, stages, values


def _record(bg, stages, values, wanted, stand_in):
    counter = _CountOps()
    with counter:
        out = profiler_build._record(bg, stages, values, wanted, stand_in)
    return out, counter.count


CASES = {"transformer_6": lambda: _transformer(6),
         **{name: (lambda n=name: (lambda m, a: (m, a[0], a[1]))(*ZOO[n]()))
            for name in ("tied_weights", "fork_join", "nested_inputs", "example_cnn")}}


@pytest.mark.parametrize("name", list(CASES))
def test_one_block_per_class_gives_the_full_pass_inputs(name):
    model, args, kwargs = CASES[name]()
    bg, first, stages, values = _setup(model, args, kwargs, 2)
    stand_in = profiler_build.stand_ins(bg, first)
    assert stand_in is not None
    fast, fast_ops = _record(bg, stages, values, first, stand_in)  # raises if the shortcut breaks
    full, full_ops = _record(bg, stages, values, first, None)
    assert fast_ops <= full_ops
    producer = bg.value_producer
    exact: set[int] = set()  # blocks whose every upstream block is computed
    for b in bg.blocks:
        if b.id in first and all(producer[v] is None or producer[v] in exact for v in b.inputs):
            exact.add(b.id)
    for b in first:
        for x, y in zip(fast[b], full[b]):
            if not isinstance(x, torch.Tensor):
                assert x == y
                continue
            assert (x.shape, x.dtype, x.requires_grad) == (y.shape, y.dtype, y.requires_grad)
            if b in exact:
                assert torch.equal(x, y), f"block {b} ({bg.blocks[b].name})"
    assert exact, "no block was checked value by value"


def test_the_pass_does_not_grow_with_depth():
    counts = {}
    for layers in (3, 9):
        model, args, kwargs = _transformer(layers)
        bg, first, stages, values = _setup(model, args, kwargs, 2)
        counts[layers] = (len(bg.classes), _record(bg, stages, values, first, profiler_build.stand_ins(bg, first))[1],
                          _record(bg, stages, values, first, None)[1])
    assert counts[3][0] == counts[9][0]  # the same classes
    assert counts[3][1] == counts[9][1]  # the same ops run
    assert counts[9][2] > 2 * counts[3][2]  # while the full pass grows with depth


class Routed(nn.Module):
    """Rows picked by a data-dependent mask (as MoE routing does): their count is an unbacked size."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        picked = x[x[:, 0] > 0]
        return picked.sum() + x.pow(2).mean()


def test_data_dependent_sizes_run_every_op():
    torch.manual_seed(0)
    model, args, kwargs = Routed(), (torch.randn(6, 8),), {}
    bg, first, stages, values = _setup(model, args, kwargs, 4)
    assert profiler_build._has_data_dependent_sizes(bg.captured)
    assert profiler_build.stand_ins(bg, first) is None
    recorded = profiler_build.record_block_inputs(bg, stages, values, first)
    assert set(recorded) == first
