"""The demo's models: a small CNN for 16x16 luma blocks (or timm's resnet18) and fresh-head copies."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["SmallCNN", "make_backbone", "with_new_head"]


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """A small CNN for 16x16 luma blocks: stem (16x16), layer1 (8x8), layer2 and layer3 (4x4), then an
    average pool to 2x2 (one cell per quadrant: where the detail is decides the partition, so the head
    keeps the layout instead of pooling it away) and fc. Stages are named like a ResNet's so
    fastcascade.add_adapters finds them and fastcascade.freeze_backbone / param_groups know the head."""

    def __init__(self, num_outputs: int, width: int = 16, in_chans: int = 1):
        super().__init__()
        self.stem = _conv(in_chans, width)
        self.layer1 = _conv(width, 2 * width, 2)
        self.layer2 = _conv(2 * width, 4 * width, 2)
        self.layer3 = _conv(4 * width, 4 * width)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16 * width, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


def make_backbone(kind: str, num_outputs: int, seed: int, width: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "small-cnn":
        return SmallCNN(num_outputs, width)
    import timm

    return timm.create_model("resnet18", pretrained=False, num_classes=num_outputs, in_chans=1)


def with_new_head(model: nn.Module, num_outputs: int, seed: int) -> nn.Module:
    """A copy of model (a trained Stage-1 backbone) with a fresh fc head of num_outputs."""
    torch.manual_seed(seed)
    m = copy.deepcopy(model)
    m.fc = nn.Linear(m.fc.in_features, num_outputs, device=m.fc.weight.device)
    return m
