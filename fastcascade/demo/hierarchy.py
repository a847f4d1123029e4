"""The seed's v6 hierarchy with its own backbones, and the flat 8-class model (which is also the shared trunk).

Stage 1 (NONE vs PARTITION, the plan's recipe: fastcascade.demo.stage1.STAGE1_RECIPE), Stage 2 (SPLIT | RECT |
AB, class-balanced softmax focal with label smoothing 0.1, pooled adapters on the frozen Stage-1 backbone), the
RECT specialist (a fine-tuned copy of the Stage-1 backbone, head first), a 3-member AB ensemble (seeds and
augmentations differ: dihedral, flips only, dihedral + mixup; the plan's per-class oversampling,
AB_CLASS_FACTORS); then a flat 8-class model trained on as many rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import data as fd
from ..adapters import add_adapters, freeze_backbone
from ..losses import ClassBalancedFocalLoss, SoftmaxFocalLoss
from .context import NUM_LABELS, Run, labels_of
from .models import make_backbone, with_new_head
from .stage1 import STAGE1_RECIPE

__all__ = ["AB_CLASS_FACTORS", "DihedralMixup", "OwnHierarchy", "stage_counts", "train_flat", "train_own_hierarchy"]


class DihedralMixup:
    """RandomDihedral then mixup of the AB targets: returns soft (N, 4) targets (class probabilities, which the
    softmax focal losses take as F.cross_entropy does)."""

    def __init__(self, alpha: float, seed: int):
        self.alpha = alpha
        self.dihedral = fd.RandomDihedral(seed=seed)
        self.generator = self.dihedral.generator

    def __call__(self, blocks: torch.Tensor, labels: torch.Tensor):
        blocks, labels = self.dihedral(blocks, labels)
        return fd.mixup(blocks, fd.stage_targets(labels)["ab"], self.alpha, self.generator, num_classes=4)


def stage_counts(y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per stage, the class counts of its targets (for the class-balanced losses)."""
    return {k: torch.bincount(v[v != fd.IGNORE_INDEX], minlength=len(fd.STAGE_CLASS_NAMES[k]))
            for k, v in fd.stage_targets(y).items()}


#: the plan's Stage 3-AB sampling (../shared/SEED-PLAN.md): HORZ_B and VERT_A 5x, HORZ_A and VERT_B 3x
AB_CLASS_FACTORS = {"HORZ_B": 5.0, "VERT_A": 5.0, "HORZ_A": 3.0, "VERT_B": 3.0}


@dataclass
class OwnHierarchy:
    stage1: nn.Module
    stage2: nn.Module
    rect: nn.Module
    ab: list[nn.Module]
    adapter_params: int

    def models(self) -> dict[str, nn.Module]:
        return {"stage1": self.stage1, "stage2": self.stage2, "rect": self.rect,
                **{f"ab{k + 1}": m for k, m in enumerate(self.ab)}}


def train_own_hierarchy(run: Run) -> OwnHierarchy:
    args, seed = run.args, run.args.seed
    counts = stage_counts(labels_of(run.train))
    s1 = make_backbone(run.backbone, 1, seed, args.width, args.stem_stride)
    s1 = run.fit("stage1", s1, STAGE1_RECIPE.loss, "stage1", seed, lr=3e-3, augment=fd.RandomDihedral(seed=seed),
                 **STAGE1_RECIPE.fit_options())

    # Stage 2: adapters on the frozen Stage-1 backbone, class-balanced focal with label smoothing
    s2 = with_new_head(s1, 3, seed + 1)
    add_adapters(s2, bottleneck=16, kind="pooled", example_input=torch.zeros(1, 1, 16, 16, device=run.device))
    trainable = freeze_backbone(s2)
    cb = ClassBalancedFocalLoss(counts["stage2"], beta=0.9999, gamma=2.0, label_smoothing=0.1).to(run.device)
    s2 = run.fit("stage2", s2, cb, "stage2", seed + 1, param_groups={"adapter": 3e-3, "head": 3e-3}, sampler=None)

    # RECT specialist: fine-tunes a copy of the Stage-1 backbone, head first (one frozen epoch)
    rect = with_new_head(s1, 2, seed + 2)
    rect = run.fit("rect", rect, SoftmaxFocalLoss(gamma=2.0), "rect", seed + 2,
                   param_groups={"head": 3e-3, "backbone": 1e-3}, freeze_epochs=1,
                   augment=fd.RandomDihedral(seed=seed + 2))

    # AB ensemble: three members, different seeds and augmentations (dihedral; flips only; dihedral + mixup),
    # the plan's oversampling of the AB classes
    augments = [fd.RandomDihedral(seed=seed + 31), fd.RandomDihedral(p_transpose=0.0, seed=seed + 32),
                DihedralMixup(alpha=0.4, seed=seed + 33)]
    # focal loss for every member, as the plan says: the mixup member's targets are class probabilities
    losses = [SoftmaxFocalLoss(gamma=2.0) for _ in range(3)]
    ab = []
    for k in range(3):
        m = with_new_head(s1, 4, seed + 3 + k)
        ab.append(run.fit(f"ab{k + 1}", m, losses[k], "ab", seed + 3 + k, lr=2e-3, augment=augments[k],
                          class_factors=AB_CLASS_FACTORS))
    return OwnHierarchy(s1, s2, rect, ab, trainable.trainable)


def train_flat(run: Run, rows: int) -> nn.Module:
    """The flat 8-class model, trained on `rows` training rows (the own hierarchy's budget)."""
    seed, y = run.args.seed + 9, labels_of(run.train)
    epochs = max(1, round(rows / len(run.train)))
    flat = make_backbone(run.backbone, NUM_LABELS, seed, run.args.width, run.args.stem_stride)
    loss = ClassBalancedFocalLoss(torch.bincount(y, minlength=NUM_LABELS), beta=0.9999, gamma=2.0,
                                  label_smoothing=0.1).to(run.device)
    return run.fit("flat", flat, loss, None, seed, lr=2e-3, epochs=epochs, augment=fd.RandomDihedral(seed=seed))

