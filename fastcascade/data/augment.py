"""Label-aware augmentation of partition blocks (flips, transposes) and mixup.

A flip or transpose of a block changes which partition fits it: hflip swaps VERT_A <-> VERT_B,
vflip swaps HORZ_A <-> HORZ_B, transpose swaps HORZ <-> VERT, HORZ_A <-> VERT_A, HORZ_B <-> VERT_B
and HORZ_4 <-> VERT_4. The functions here move blocks and labels together; AV1_TTA_LABEL_MAPS are the
same label maps for fastcascade.tta_predict's transforms (test-time augmentation of partition classifiers).
"""

from __future__ import annotations

import numpy as np
import torch

from ..segmentation import TTA_TRANSFORMS, tta_label_map
from .labels import HFLIP_LABELS, TRANSPOSE_LABELS, VFLIP_LABELS, check_labels

# transform name -> int64 (10,) map of partition labels, for tta_predict(..., label_maps=AV1_TTA_LABEL_MAPS)
AV1_TTA_LABEL_MAPS: dict[str, torch.Tensor] = {
    name: tta_label_map(name, {"hflip": HFLIP_LABELS, "vflip": VFLIP_LABELS, "transpose": TRANSPOSE_LABELS})
    for name in TTA_TRANSFORMS}


def _check_blocks(blocks: torch.Tensor) -> None:
    if not isinstance(blocks, torch.Tensor) or blocks.dim() < 2 or blocks.shape[-1] != blocks.shape[-2]:
        got = tuple(blocks.shape) if isinstance(blocks, torch.Tensor) else type(blocks).__name__
        raise ValueError(f"blocks: expected a tensor (N, ..., S, S) of square blocks, got {got}")


def _map(table: torch.Tensor, labels):
    return None if labels is None else table.to(labels.device)[check_labels(labels)]


def hflip(blocks: torch.Tensor, labels: torch.Tensor | None = None):
    """Flip left-right; labels (if given) mapped with HFLIP_LABELS. Returns (blocks, labels)."""
    _check_blocks(blocks)
    return blocks.flip(-1), _map(HFLIP_LABELS, labels)


def vflip(blocks: torch.Tensor, labels: torch.Tensor | None = None):
    """Flip up-down; labels (if given) mapped with VFLIP_LABELS. Returns (blocks, labels)."""
    _check_blocks(blocks)
    return blocks.flip(-2), _map(VFLIP_LABELS, labels)


def transpose(blocks: torch.Tensor, labels: torch.Tensor | None = None):
    """Swap rows and columns; labels (if given) mapped with TRANSPOSE_LABELS. Returns (blocks, labels)."""
    _check_blocks(blocks)
    return blocks.transpose(-1, -2), _map(TRANSPOSE_LABELS, labels)


def random_dihedral(blocks: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None,
                    p_hflip: float = 0.5, p_vflip: float = 0.5, p_transpose: float = 0.5):
    """Per sample, transpose / hflip / vflip (in that order) each with its probability; labels follow.

    With all three at 0.5 every one of the 8 symmetries of the square is equally likely. blocks: (N, C,
    S, S) of any dtype; labels: (N,) final labels. Random draws come from ``generator`` (on the CPU),
    so a seeded generator gives the same batch every time. Returns new (blocks, labels).
    """
    _check_blocks(blocks)
    labels = check_labels(labels)
    n = blocks.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels: expected shape ({n},) to match blocks, got {tuple(labels.shape)}")
    for name, p in (("p_hflip", p_hflip), ("p_vflip", p_vflip), ("p_transpose", p_transpose)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name}: expected a probability in [0, 1], got {p}")
    draws = torch.rand(3, n, generator=generator)
    dev = blocks.device
    t, h, v = ((draws[i] < p).to(dev) for i, p in enumerate((p_transpose, p_hflip, p_vflip)))
    bshape = (n,) + (1,) * (blocks.dim() - 1)
    blocks = torch.where(t.view(bshape), blocks.transpose(-1, -2), blocks)
    labels = torch.where(t, TRANSPOSE_LABELS.to(dev)[labels], labels)
    blocks = torch.where(h.view(bshape), blocks.flip(-1), blocks)
    labels = torch.where(h, HFLIP_LABELS.to(dev)[labels], labels)
    blocks = torch.where(v.view(bshape), blocks.flip(-2), blocks)
    labels = torch.where(v, VFLIP_LABELS.to(dev)[labels], labels)
    return blocks, labels


class RandomDihedral:
    """Callable form of :func:`random_dihedral` for a training loop: ``blocks, labels = aug(blocks, labels)``.
    Owns a generator seeded with ``seed``, so runs repeat."""

    def __init__(self, p_hflip: float = 0.5, p_vflip: float = 0.5, p_transpose: float = 0.5, seed: int = 0):
        self.p = (p_hflip, p_vflip, p_transpose)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, blocks: torch.Tensor, labels: torch.Tensor):
        return random_dihedral(blocks, labels, self.generator, *self.p)


def mixup(blocks: torch.Tensor, targets: torch.Tensor, alpha: float = 0.2,
          generator: torch.Generator | None = None, num_classes: int | None = None):
    """Mixup (Zhang et al. 2018): convex combinations of pairs of samples and of their targets.

    Each sample i is mixed with sample perm[i] of the same batch: ``x_i' = lam_i x_i + (1 - lam_i)
    x_perm[i]`` and likewise for the targets, with ``lam_i ~ Beta(alpha, alpha)`` folded to
    ``max(lam, 1 - lam)`` so each mixed sample stays closest to its own.

    Args:
        blocks: (N, ...) uint8 or float; the result is float32 (or the input's float dtype).
        targets: (N,) class ids (then ``num_classes`` is required), or (N, C) one-hot / soft targets.
        alpha: Beta concentration; ``alpha <= 0`` disables mixing (lam = 1).
        generator: CPU generator for the permutation and the lambdas (seeded → reproducible).

    Returns:
        (mixed blocks, soft targets (N, C) float32 whose rows sum to 1 when the inputs' do).
    """
    if not isinstance(blocks, torch.Tensor) or blocks.dim() < 1:
        raise ValueError(f"blocks: expected a tensor (N, ...), got {type(blocks).__name__}")
    n = blocks.shape[0]
    if targets.dim() == 1:
        if num_classes is None:
            raise ValueError("num_classes: required when targets are class ids (N,)")
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise ValueError(f"targets: class ids must be an integer tensor, got {targets.dtype}")
        ids = targets.long()
        if ids.numel() and (ids.min() < 0 or ids.max() >= num_classes):
            raise ValueError(f"targets: expected class ids in [0, {num_classes}), got range "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        soft = torch.nn.functional.one_hot(ids, num_classes).float()
    elif targets.dim() == 2:
        soft = targets.float()
    else:
        raise ValueError("targets: expected (N,) class ids or (N, C) soft targets, got shape "
                         f"{tuple(targets.shape)}")
    if soft.shape[0] != n:
        raise ValueError(f"targets: expected {n} rows to match blocks, got {soft.shape[0]}")
    x = blocks if blocks.is_floating_point() else blocks.float()
    if alpha <= 0 or n == 0:
        return x.clone(), soft
    perm = torch.randperm(n, generator=generator)
    # torch's Beta sampler takes no generator: seed numpy's from ours so the draw stays reproducible.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lam = np.random.default_rng(seed).beta(alpha, alpha, size=n)
    lam = torch.from_numpy(np.maximum(lam, 1.0 - lam))
    dev = x.device
    perm = perm.to(dev)
    lam_x = lam.to(device=dev, dtype=x.dtype).view((n,) + (1,) * (x.dim() - 1))
    lam_t = lam.to(device=dev, dtype=soft.dtype).view(n, 1)
    return lam_x * x + (1 - lam_x) * x[perm], lam_t * soft + (1 - lam_t) * soft[perm]
