"""The block timer's run counts: the memory pass is the first warm-up, timing stops when runs agree."""

from __future__ import annotations

import torch

from rannc_cli.profiler import measure


class Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return (self.lin(x),)


def test_memory_pass_is_the_first_warm_up():
    for warmup, repeats, expected in ((2, 1, 3), (1, 1, 2), (0, 1, 2)):
        block = Counting()
        cost = measure.measure_block(block, [torch.randn(4, 8, requires_grad=True)], 4, warmup=warmup,
                                     repeats=repeats)
        assert block.calls == expected, (warmup, repeats, block.calls)
        assert cost.forward_seconds > 0 and cost.backward_seconds > 0 and cost.flops_forward == 2 * 4 * 8 * 8


def test_timing_stops_once_runs_agree_or_the_budget_is_spent():
    steady = [0.100, 0.101, 0.1005]
    assert not measure._enough(steady[:2], [0.0, 0.0], budget_seconds=10)
    assert measure._enough(steady, [0.0] * 3, budget_seconds=10)
    spread = [0.100, 0.120, 0.100]   # 20% apart: keep timing
    assert not measure._enough(spread, [0.0] * 3, budget_seconds=10)
    assert measure._enough([0.6], [0.5], budget_seconds=1.0)


def test_repeats_bound_the_timed_runs():
    block = Counting()
    measure.measure_block(block, [torch.randn(4, 8, requires_grad=True)], 4, warmup=1, repeats=5)
    assert 1 + 3 <= block.calls <= 1 + 5
