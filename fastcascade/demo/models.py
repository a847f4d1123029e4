"""The demo's models: a small CNN for 16x16 luma blocks (or timm's resnet18), fresh-head copies, and pooling as
a matrix product (GridPool). The designs are timed in fastcascade.inference_form (batch norm folded)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GridPool", "SmallCNN", "make_backbone", "with_new_head"]


class GridPool(nn.Module):
    """Average pooling to p x p cells (nn.AdaptiveAvgPool2d(p) where p divides the height and width) as one
    matrix product: (N*C, H*W) @ (H*W, p*p). On one CPU core aten's adaptive pooling of the heads' small maps
    took 18 ms for 2,760 blocks of 32x8x8 where the product takes 5 ms, the same cells up to rounding (each
    a sum of k*k values times 1/(k*k)); other sizes fall back to adaptive pooling."""

    def __init__(self, cells: int):
        super().__init__()
        self.cells = cells
        self._weights: dict = {}

    def _matrix(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        key = (h, w, like.dtype, like.device)
        if key not in self._weights:
            p, kh, kw = self.cells, h // self.cells, w // self.cells
            rows = torch.arange(h * w, device=like.device)
            cell = (rows // w // kh) * p + (rows % w) // kw
            m = torch.zeros(h * w, p * p, dtype=like.dtype, device=like.device)
            m[rows, cell] = 1.0 / (kh * kw)
            self._weights[key] = m
        return self._weights[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if h % self.cells or w % self.cells or not x.is_floating_point():
            return F.adaptive_avg_pool2d(x, self.cells)
        return (x.reshape(n * c, h * w) @ self._matrix(h, w, x)).reshape(n, c, self.cells, self.cells)

    def extra_repr(self) -> str:
        return f"cells={self.cells}"


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """A small CNN for 16x16 luma blocks: stem (16x16), layer1 (8x8), layer2 and layer3 (4x4), then an
    average pool to 2x2 (one cell per quadrant: where the detail is decides the partition, so the head
    keeps the layout instead of pooling it away) and fc. Stages are named like a ResNet's so
    fastcascade.add_adapters finds them and fastcascade.freeze_backbone / param_groups know the head.

    stem_stride=2 moves layer1's stride into the stem (stem and layer1 both at 8x8; FLOPs within 3%): on
    one CPU core the full-resolution stem is memory-bound and costs far more time than its FLOPs, which an
    exit after layer1 can never skip, so the strided stem makes early exits pay more, at a cost in accuracy
    (measured in docs/demo.md)."""

    def __init__(self, num_outputs: int, width: int = 16, in_chans: int = 1, stem_stride: int = 1):
        super().__init__()
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride!r}")
        self.stem = _conv(in_chans, width, stem_stride)
        self.layer1 = _conv(width, 2 * width, 3 - stem_stride)
        self.layer2 = _conv(2 * width, 4 * width, 2)
        self.layer3 = _conv(4 * width, 4 * width)
        self.pool = GridPool(2)
        self.fc = nn.Linear(16 * width, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


def make_backbone(kind: str, num_outputs: int, seed: int, width: int = 16, stem_stride: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "small-cnn":
        return SmallCNN(num_outputs, width, stem_stride=stem_stride)
    import timm

    return timm.create_model("resnet18", pretrained=False, num_classes=num_outputs, in_chans=1)


def with_new_head(model: nn.Module, num_outputs: int, seed: int) -> nn.Module:
    """A copy of model (a trained Stage-1 backbone) with a fresh fc head of num_outputs."""
    torch.manual_seed(seed)
    m = copy.deepcopy(model)
    m.fc = nn.Linear(m.fc.in_features, num_outputs, device=m.fc.weight.device)
    return m
