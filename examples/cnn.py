"""A small residual CNN with GroupNorm on synthetic images, with the one rannc line.

    python examples/cnn.py --steps 10
    rannc profile examples/cnn.py
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from rannc_cli import RaNNCModule


class ResBlock(nn.Module):
    def __init__(self, channels: int, groups: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.relu(x + h)  # skip connection


class CNN(nn.Module):
    """Stem, residual stages with downsampling, pooled linear head; forward returns the loss."""

    def __init__(self, width: int = 32, blocks_per_stage: int = 2, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.GroupNorm(8, width), nn.ReLU())
        stages = []
        channels = width
        for i in range(3):
            if i > 0:
                stages.append(nn.Sequential(nn.Conv2d(channels, channels * 2, 3, stride=2, padding=1, bias=False),
                                            nn.GroupNorm(8, channels * 2), nn.ReLU()))
                channels *= 2
            stages.extend(ResBlock(channels) for _ in range(blocks_per_stage))
        self.body = nn.Sequential(*stages)
        self.head = nn.Linear(channels, classes)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.body(self.stem(images))
        logits = self.head(h.mean(dim=(2, 3)))
        return F.cross_entropy(logits, labels)


def batches(steps: int, batch_size: int, seed: int, classes: int = 10, size: int = 16):
    """Synthetic images whose class is encoded as a bright patch position."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        labels = torch.randint(0, classes, (batch_size,), generator=gen)
        images = 0.1 * torch.randn(batch_size, 3, size, size, generator=gen)
        for i, c in enumerate(labels.tolist()):
            images[i, c % 3, (c // 3) * 4:(c // 3) * 4 + 4, :4] += 1.0
        yield images, labels


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = CNN(width=args.width)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model = RaNNCModule(model, optimizer)  # the one added line

    for step, (images, labels) in enumerate(batches(args.steps, args.batch_size, args.seed)):
        loss = model(images, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step} loss {loss.item():.4f}", flush=True)


if __name__ == "__main__":
    main()
