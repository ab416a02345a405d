"""Shared tiny models for the FedBiCross server tests (CPU, a few ms per forward pass).

A plain module (not a conftest.py) so its name cannot clash with tests/conftest.py.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TinyCNN(nn.Module):
    """conv3x3 -> BatchNorm2d -> ReLU -> global average pool -> linear: one BN layer."""

    def __init__(self, in_channels: int = 1, num_classes: int = 3, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn(self.conv(x)))  # (B, width, H, W)
        return self.fc(h.mean(dim=(2, 3)))  # (B, num_classes)


class ConstantLogits(nn.Module):
    """Returns the same logits for every input (for hand-computed ensemble values)."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))

    def forward(self, x: Tensor) -> Tensor:
        return self.logits.expand(x.shape[0], -1)


def make_tiny(seed: int, in_channels: int = 1, num_classes: int = 3, dtype=torch.float32) -> TinyCNN:
    """A seeded TinyCNN with non-trivial BN running statistics, in eval mode."""
    torch.manual_seed(seed)
    model = TinyCNN(in_channels, num_classes).to(dtype)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model.eval()

