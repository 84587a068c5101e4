"""A plain MLP classifier, written for one device, with the one rannc line.

    python examples/mlp.py --steps 20                 # plain PyTorch
    rannc profile examples/mlp.py                      # capture + profile at the first forward
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from rannc_cli import RaNNCModule


class MLP(nn.Module):
    """Classifier whose forward returns the loss."""

    def __init__(self, d_in: int = 64, hidden: int = 256, layers: int = 6, classes: int = 10):
        super().__init__()
        dims = [d_in] + [hidden] * layers
        self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(dims, dims[1:])])
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.head(self.layers(x)), y)


def batches(steps: int, batch_size: int, d_in: int, classes: int, seed: int):
    """A learnable synthetic task: the label is the argmax of a fixed projection."""
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(d_in, classes, generator=gen)
    for _ in range(steps):
        x = torch.randn(batch_size, d_in, generator=gen)
        yield x, (x @ proj).argmax(dim=1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = MLP(hidden=args.hidden, layers=args.layers)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model = RaNNCModule(model, optimizer)  # the one added line

    for step, (x, y) in enumerate(batches(args.steps, args.batch_size, 64, 10, args.seed)):
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step} loss {loss.item():.4f}", flush=True)


if __name__ == "__main__":
    main()
