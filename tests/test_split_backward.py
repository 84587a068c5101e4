"""The zero-bubble split backward (runtime/split_backward.py) gives plain backward's numbers, bit for bit.

One process: a stage-like module (two microbatches, a received activation that wants a gradient,
a user input that does not, a parameter used twice, a branch that never touches the activation,
attention, LayerNorm) is backwarded once as ``torch.autograd.backward`` and once as B for every
microbatch followed by W for every microbatch; input gradients, parameter gradients and the
number of post-accumulate-grad hook calls must be identical.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rannc_cli.runtime.split_backward import split_backward


class Stage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 8)
        self.ln, self.emb = nn.LayerNorm(8), nn.Embedding(10, 8)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.unused = nn.Linear(3, 3)

    def forward(self, h: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.ln(self.b(torch.relu(self.a(h))) + self.emb(ids))
        y, _ = self.att(x, x, x)
        side = self.c(self.emb(ids)).sum(1)  # reads the user input only: no path through h
        return self.frozen(y) + x @ self.a.weight[:8, :8], side  # a.weight used a second time


def _train(split: bool, with_input_grad: bool) -> tuple[list, dict, dict]:
    torch.manual_seed(0)
    model = Stage()
    calls: dict[str, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda _p, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    h_all, ids_all = torch.randn(4, 5, 8), torch.randint(0, 10, (4, 5))
    kept = []
    for m in range(2):
        h = h_all[2 * m:2 * m + 2].clone().requires_grad_(with_input_grad)
        y, side = model(h, ids_all[2 * m:2 * m + 2])
        kept.append((h, [y, side], [torch.randn_like(y), torch.randn_like(side)]))
    input_grads, pending = [], []
    for h, outs, grads in kept:
        if split:
            got, weight = split_backward(outs, grads, [h if with_input_grad else None, None], list(model.parameters()))
            input_grads.append(got[0])
            pending.append(weight)
        else:
            torch.autograd.backward(outs, grads)
            input_grads.append(h.grad)
    for weight in pending:
        weight.run()
    return input_grads, {n: p.grad for n, p in model.named_parameters()}, calls


@pytest.mark.parametrize("with_input_grad", [True, False], ids=["input-wants-grad", "first-stage"])
def test_split_backward_equals_plain_backward_bit_for_bit(with_input_grad):
    plain, split = _train(False, with_input_grad), _train(True, with_input_grad)
    for a, b in zip(plain[0], split[0]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert plain[1].keys() == split[1].keys()
    for name, g in plain[1].items():
        other = split[1][name]
        assert (g is None and other is None) or torch.equal(g, other), name
    assert plain[1]["unused.weight"] is None and plain[1]["frozen.weight"] is None
    assert plain[2] == split[2] and set(plain[2].values()) == {2}  # one accumulation per microbatch
