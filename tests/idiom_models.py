"""Models for the script-idiom tests (tests/test_runtime_idioms.py), looked up like the zoo's.

    model, (args, kwargs) = IDIOM_MODELS["bn_cnn"]()
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class BatchNormCNN(nn.Module):
    """Two conv + BatchNorm2d blocks and a linear head: the ResNet pattern in small."""

    def __init__(self, width: int = 8, classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, classes)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(images)))
        h = F.relu(self.bn2(self.conv2(h)) + h)
        return F.cross_entropy(self.head(h.mean(dim=(2, 3))), labels)


class LossAndLogits(nn.Module):
    """Returns (loss, logits), as scripts that compute accuracy from the logits do."""

    def __init__(self, d: int = 16, classes: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, classes))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.body(x)
        return F.cross_entropy(logits, y), logits


def bn_cnn():
    g = torch.Generator().manual_seed(0)
    return BatchNormCNN(), ((torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 4, (8,), generator=g)), {})


def loss_and_logits():
    g = torch.Generator().manual_seed(0)
    return LossAndLogits(), ((torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)), {})


IDIOM_MODELS = {"bn_cnn": bn_cnn, "loss_and_logits": loss_and_logits}
