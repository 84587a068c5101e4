"""Test models covering what capture must handle, each with a batch maker.

    model, (args, kwargs) = ZOO["fork_join"]()
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import load_example

Batch = tuple[tuple, dict]


class ForkJoin(nn.Module):
    """Two branches from one input, joined, plus a skip connection over both."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.left = nn.Sequential(nn.Linear(d, d), nn.Tanh())
        self.right = nn.Sequential(nn.Linear(d, d), nn.Sigmoid())
        self.mix = nn.Linear(d, d)
        self.out = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.inp(x))
        joined = self.left(h) * self.right(h)
        h2 = self.mix(joined) + h + x  # skips over two and three modules
        return F.cross_entropy(self.out(h2), y)


class TiedWeights(nn.Module):
    """Embedding and output projection share one parameter; used far apart in the graph."""

    def __init__(self, vocab: int = 32, d: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.body = nn.Sequential(*[nn.Sequential(nn.Linear(d, d), nn.GELU()) for _ in range(3)])
        self.proj = nn.Linear(d, vocab, bias=False)
        self.proj.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.proj(self.body(self.emb(tokens)))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class WithBatchNorm(nn.Module):
    """BatchNorm buffers (running stats, num_batches_tracked) are updated by forward."""

    def __init__(self, d: int = 12):
        super().__init__()
        self.l1 = nn.Linear(d, 24)
        self.bn1 = nn.BatchNorm1d(24)
        self.l2 = nn.Linear(24, 24)
        self.bn2 = nn.BatchNorm1d(24)
        self.head = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.l1(x)))
        h = F.relu(self.bn2(self.l2(h)))
        return F.cross_entropy(self.head(h), y)


class InPlaceOps(nn.Module):
    """In-place ops on intermediates: relu_, +=, mul_, masked_fill_."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)
        self.c = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h.relu_()
        g = self.b(h)
        g += h
        g.mul_(0.5)
        g.masked_fill_(g > 3.0, 3.0)
        return F.mse_loss(self.c(g).squeeze(-1), target)


class MultiOutput(nn.Module):
    """Two heads whose losses are combined into one scalar."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.cls = nn.Linear(32, 5)
        self.reg = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor, labels: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        return F.cross_entropy(self.cls(h), labels) + 0.5 * F.mse_loss(self.reg(h), values)


class WithDropout(nn.Module):
    def __init__(self, d: int = 16):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 32), nn.ReLU(),
                                    nn.Dropout(0.2), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.layers(x), y)


class NestedInputs(nn.Module):
    """Keyword arguments, nested dict/tuple/list inputs and non-tensor arguments."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.fx = nn.Linear(d, 16)
        self.fp = nn.Linear(d, 16)
        self.out = nn.Linear(16, 1)

    def forward(self, batch: dict, pair: tuple, *, scale: float = 1.0, use_pair: bool = True,
                extra: Any = None, steps: int = 2) -> torch.Tensor:
        h = self.fx(batch["x"])
        if use_pair:
            h = h + self.fp(pair[0]) - 0.5 * self.fp(pair[1][0])
        for _ in range(steps):
            h = torch.tanh(h)
        pred = self.out(h).squeeze(-1) * scale
        return F.mse_loss(pred, batch["target"])


class RowWeights(nn.Module):
    """An input only indexed by rows (as Hugging Face's mask code does): export does not tie its
    dim 0 to the batch by itself, yet it is per-sample data and must be split like the others."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.l = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (self.l(x).squeeze(-1) * w[: x.shape[0]]).mean()


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _classify(d: int, classes: int, b: int = 8) -> Batch:
    g = _gen()
    return (torch.randn(b, d, generator=g), torch.randint(0, classes, (b,), generator=g)), {}


def fork_join():
    return ForkJoin(), _classify(16, 4)


def tied_weights():
    g = _gen()
    seq = torch.randint(0, 32, (6, 9), generator=g)
    return TiedWeights(), ((seq[:, :-1], seq[:, 1:]), {})


def batch_norm():
    return WithBatchNorm(), _classify(12, 3)


def in_place():
    g = _gen()
    return InPlaceOps(), ((torch.randn(8, 16, generator=g), torch.randn(8, generator=g)), {})


def multi_output():
    g = _gen()
    return MultiOutput(), ((torch.randn(8, 16, generator=g), torch.randint(0, 5, (8,), generator=g),
                            torch.randn(8, 2, generator=g)), {})


def dropout():
    return WithDropout(), _classify(16, 4)


def nested_inputs():
    g = _gen()
    b = 6
    batch = {"x": torch.randn(b, 8, generator=g), "target": torch.randn(b, generator=g)}
    pair = (torch.randn(b, 8, generator=g), [torch.randn(b, 8, generator=g)])
    return NestedInputs(), ((batch, pair), {"scale": 2.0, "use_pair": True, "extra": None, "steps": 3})


def row_weights():
    g = _gen()
    return RowWeights(), ((torch.randn(8, 8, generator=g), torch.rand(8, generator=g)), {})


def example_mlp():
    ex = load_example("mlp")
    x, y = next(ex.batches(1, 8, 64, 10, 0))
    return ex.MLP(hidden=32, layers=4), ((x, y), {})


def example_cnn():
    ex = load_example("cnn")
    images, labels = next(ex.batches(1, 4, 0))
    return ex.CNN(width=16), ((images, labels), {})


def example_transformer():
    ex = load_example("transformer_lm")
    tokens, targets, padding = next(ex.batches(1, 4, 16, 128, 0))
    return ex.TransformerLM(vocab=128, d_model=32, heads=4, layers=3, seq_len=16), \
        ((tokens, targets), {"padding": padding})


ZOO: dict[str, Callable[[], tuple[torch.nn.Module, Batch]]] = {
    "fork_join": fork_join,
    "tied_weights": tied_weights,
    "batch_norm": batch_norm,
    "in_place": in_place,
    "multi_output": multi_output,
    "dropout": dropout,
    "nested_inputs": nested_inputs,
    "row_weights": row_weights,
    "example_mlp": example_mlp,
    "example_cnn": example_cnn,
    "example_transformer": example_transformer,
}

RANDOM = {"dropout", "example_transformer"}  # models with random ops: exactness needs graph-order execution
