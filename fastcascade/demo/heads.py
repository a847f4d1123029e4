"""Heads on the frozen shared trunk (the flat model's backbone): small MLPs on pooled segment features.

Each head is pool (GridPool: adaptive average pooling as a matrix product) -> flatten -> MLP on one trunk
segment's output. The pooling has no parameters, so the
MLPs train on features pooled once per block and cached (no trunk pass per epoch, no augmentation): a
head costs a few seconds to train and, at run time, a few percent of a backbone pass. Heads on frozen
trunk features were the seed's best Stage-2 result (frozen 48.5% vs adapters 47.7%).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..losses import ClassBalancedFocalLoss, SoftmaxFocalLoss
from .context import NUM_LABELS, Run, blocks_of, labels_of
from .hierarchy import stage1_loss, stage_counts
from .models import GridPool

__all__ = ["TrunkHeads", "pooled_features", "train_trunk_heads"]

HIDDEN = 64


@torch.no_grad()
def pooled_features(trunk: nn.ModuleDict, x: torch.Tensor, pools: dict[str, int], device,
                    chunk: int = 2048) -> dict[str, torch.Tensor]:
    """{segment: (N, C * p * p)} the segment outputs of blocks x, average-pooled to p x p and flattened."""
    trunk.eval()
    out = {name: [] for name in pools}
    for i in range(0, x.shape[0], chunk):
        h = x[i:i + chunk].to(device)
        for name, seg in trunk.items():
            h = seg(h)
            if name in pools:
                out[name].append(GridPool(pools[name])(h).flatten(1).float())
    return {k: torch.cat(v) for k, v in out.items()}


def _mlp(d_in: int, k: int, seed: int, device) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, k)).to(device)


@dataclass
class TrunkHeads:
    """The heads (pool + MLP modules taking a segment's output) and the segment each one taps."""

    heads: dict[str, nn.Module]
    taps: dict[str, str]

    def ab(self) -> list[nn.Module]:
        return [self.heads[f"ab{k}"] for k in (1, 2, 3)]


def train_trunk_heads(run: Run, trunk: nn.ModuleDict) -> TrunkHeads:
    """The v6 hierarchy's heads (stage1 on the first segment, stage2 / rect / three AB members on the last)
    and two 8-class exit heads (after the first and the second segment), on the frozen trunk."""
    segs = list(trunk)
    early, mid, last = segs[0], segs[min(1, len(segs) - 1)], segs[-1]
    with torch.no_grad():
        shapes, h = {}, torch.zeros(1, 1, 16, 16, device=run.device)
        for name, seg in trunk.eval().items():
            h = seg(h)
            shapes[name] = h.shape
    pools = {early: min(4, shapes[early][-1]), mid: min(2, shapes[mid][-1]), last: min(2, shapes[last][-1])}
    feats = {split: pooled_features(trunk, blocks_of(ds), pools, run.device)
             for split, ds in (("train", run.train), ("val", run.val))}
    y = {"train": labels_of(run.train).to(run.device), "val": labels_of(run.val).to(run.device)}
    counts = stage_counts(labels_of(run.train))
    seed = run.args.seed + 50
    cb8 = ClassBalancedFocalLoss(torch.bincount(labels_of(run.train), minlength=NUM_LABELS), beta=0.9999, gamma=2.0,
                                 label_smoothing=0.1).to(run.device)
    cb3 = ClassBalancedFocalLoss(counts["stage2"], beta=0.9999, gamma=2.0, label_smoothing=0.1).to(run.device)
    cb4 = ClassBalancedFocalLoss(counts["ab"], beta=0.9999, gamma=2.0, label_smoothing=0.1).to(run.device)
    # name: (segment, outputs, loss, stage target, fit options)
    specs = {"stage1": (early, 1, stage1_loss, "stage1", {}),
             "stage2": (last, 3, cb3, "stage2", {}),
             "rect": (last, 2, SoftmaxFocalLoss(gamma=2.0), "rect", {}),
             "ab1": (last, 4, SoftmaxFocalLoss(gamma=2.0), "ab", {}),
             "ab2": (last, 4, SoftmaxFocalLoss(gamma=2.0), "ab", {"sampler": "class_balanced"}),
             "ab3": (last, 4, cb4, "ab", {}),
             "exit1": (early, NUM_LABELS, cb8, None, {}),
             "exit2": (mid, NUM_LABELS, cb8, None, {})}
    heads, taps = {}, {}
    for k, (name, (seg, outs, loss, target, kw)) in enumerate(specs.items()):
        train = TensorDataset(feats["train"][seg], y["train"])
        val = TensorDataset(feats["val"][seg], y["val"])
        mlp = _mlp(feats["train"][seg].shape[1], outs, seed + k, run.device)
        mlp = run.fit(f"trunk_{name}", mlp, loss, target, seed + k, train=train, val=val, lr=3e-3, batch_size=256, **kw)
        heads[name] = nn.Sequential(GridPool(pools[seg]), nn.Flatten(1), *mlp).eval()
        taps[name] = seg
    return TrunkHeads(heads, taps)
