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
from .hierarchy import stage_counts
from .models import GridPool
from .stage1 import STAGE1_RECIPE, Stage1Recipe

__all__ = ["TrunkFeatures", "TrunkHeads", "pooled_features", "train_stage1_head", "train_trunk_heads", "trunk_features"]

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


@dataclass
class TrunkFeatures:
    """The train and val blocks' pooled trunk features (segment -> (N, C * p * p)), labels, and the pooling."""

    pools: dict[str, int]
    train: dict[str, torch.Tensor]
    val: dict[str, torch.Tensor]
    y_train: torch.Tensor
    y_val: torch.Tensor
    early: str  # the segment Stage 1 and the first exit read
    mid: str
    last: str


def trunk_features(run: Run, trunk: nn.ModuleDict) -> TrunkFeatures:
    """Pooled features of the run's train and val blocks after the trunk's first, second and last segments."""
    segs = list(trunk)
    early, mid, last = segs[0], segs[min(1, len(segs) - 1)], segs[-1]
    with torch.no_grad():
        shapes, h = {}, torch.zeros(1, 1, 16, 16, device=run.device)
        for name, seg in trunk.eval().items():
            h = seg(h)
            shapes[name] = h.shape
    pools = {early: min(4, shapes[early][-1]), mid: min(2, shapes[mid][-1]), last: min(2, shapes[last][-1])}
    return TrunkFeatures(pools, pooled_features(trunk, blocks_of(run.train), pools, run.device),
                         pooled_features(trunk, blocks_of(run.val), pools, run.device),
                         labels_of(run.train).to(run.device), labels_of(run.val).to(run.device), early, mid, last)


def _train_head(run: Run, f: TrunkFeatures, key: str, seg: str, outs: int, loss, target: str | None, seed: int,
                **kw) -> nn.Module:
    train = TensorDataset(f.train[seg], f.y_train)
    val = TensorDataset(f.val[seg], f.y_val)
    mlp = _mlp(f.train[seg].shape[1], outs, seed, run.device)
    mlp = run.fit(key, mlp, loss, target, seed, train=train, val=val, lr=3e-3, batch_size=256, **kw)
    return nn.Sequential(GridPool(f.pools[seg]), nn.Flatten(1), *mlp).eval()


def train_stage1_head(run: Run, f: TrunkFeatures, recipe: Stage1Recipe = STAGE1_RECIPE,
                      key: str = "trunk_stage1") -> nn.Module:
    """The Stage-1 head on the trunk's first segment, trained with `recipe`, recorded under `key`."""
    return _train_head(run, f, key, f.early, 1, recipe.loss, "stage1", run.args.seed + 50, **recipe.fit_options())


def train_trunk_heads(run: Run, trunk: nn.ModuleDict, features: TrunkFeatures | None = None) -> TrunkHeads:
    """The v6 hierarchy's heads (stage1 on the first segment, stage2 / rect / three AB members on the last)
    and two 8-class exit heads (after the first and the second segment), on the frozen trunk."""
    f = trunk_features(run, trunk) if features is None else features
    counts = stage_counts(labels_of(run.train))
    seed = run.args.seed + 50
    cb8 = ClassBalancedFocalLoss(torch.bincount(labels_of(run.train), minlength=NUM_LABELS), beta=0.9999, gamma=2.0,
                                 label_smoothing=0.1).to(run.device)
    cb3 = ClassBalancedFocalLoss(counts["stage2"], beta=0.9999, gamma=2.0, label_smoothing=0.1).to(run.device)
    cb4 = ClassBalancedFocalLoss(counts["ab"], beta=0.9999, gamma=2.0, label_smoothing=0.1).to(run.device)
    # name: (segment, outputs, loss, stage target, fit options); stage1 first: train_stage1_head
    specs = {"stage2": (f.last, 3, cb3, "stage2", {}),
             "rect": (f.last, 2, SoftmaxFocalLoss(gamma=2.0), "rect", {}),
             "ab1": (f.last, 4, SoftmaxFocalLoss(gamma=2.0), "ab", {}),
             "ab2": (f.last, 4, SoftmaxFocalLoss(gamma=2.0), "ab", {"sampler": "class_balanced"}),
             "ab3": (f.last, 4, cb4, "ab", {}),
             "exit1": (f.early, NUM_LABELS, cb8, None, {}),
             "exit2": (f.mid, NUM_LABELS, cb8, None, {})}
    heads, taps = {"stage1": train_stage1_head(run, f)}, {"stage1": f.early}
    for k, (name, (seg, outs, loss, target, kw)) in enumerate(specs.items(), start=1):
        heads[name] = _train_head(run, f, f"trunk_{name}", seg, outs, loss, target, seed + k, **kw)
        taps[name] = seg
    return TrunkHeads(heads, taps)
