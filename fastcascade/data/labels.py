"""Partition labels of a 16x16 block: ids, geometry, symmetry tables and the cascade's stage targets.

Label ids follow libaom's ``PARTITION_TYPE`` enum order::

    NONE=0 HORZ=1 VERT=2 SPLIT=3 HORZ_A=4 HORZ_B=5 VERT_A=6 VERT_B=7 HORZ_4=8 VERT_4=9

The first eight are the "main" classes; HORZ_4 / VERT_4 appear only when a dataset is built with
``include_4way=True``.
"""

from __future__ import annotations

import torch

from ..metrics import IGNORE_INDEX

NONE, HORZ, VERT, SPLIT, HORZ_A, HORZ_B, VERT_A, VERT_B, HORZ_4, VERT_4 = range(10)
LABEL_NAMES = ("NONE", "HORZ", "VERT", "SPLIT", "HORZ_A", "HORZ_B", "VERT_A", "VERT_B", "HORZ_4", "VERT_4")
NUM_MAIN_CLASSES = 8
NUM_CLASSES = 10
BLOCK_SIZE = 16

# Sub-blocks of each partition of a 16x16 block as (row, col, height, width), libaom geometry:
# the "A" types split the first half (top / left), the "B" types the second half (bottom / right).
PARTITION_RECTS = {
    NONE: ((0, 0, 16, 16),),
    HORZ: ((0, 0, 8, 16), (8, 0, 8, 16)),
    VERT: ((0, 0, 16, 8), (0, 8, 16, 8)),
    SPLIT: ((0, 0, 8, 8), (0, 8, 8, 8), (8, 0, 8, 8), (8, 8, 8, 8)),
    HORZ_A: ((0, 0, 8, 8), (0, 8, 8, 8), (8, 0, 8, 16)),
    HORZ_B: ((0, 0, 8, 16), (8, 0, 8, 8), (8, 8, 8, 8)),
    VERT_A: ((0, 0, 8, 8), (8, 0, 8, 8), (0, 8, 16, 8)),
    VERT_B: ((0, 0, 16, 8), (0, 8, 8, 8), (8, 8, 8, 8)),
    HORZ_4: tuple((4 * i, 0, 4, 16) for i in range(4)),
    VERT_4: tuple((0, 4 * i, 16, 4) for i in range(4)),
}


def partition_map(label: int) -> torch.Tensor:
    """(16, 16) int64 map giving each pixel the index of its sub-block under partition ``label``."""
    if not 0 <= int(label) < NUM_CLASSES:
        raise ValueError(f"label: expected an int in [0, {NUM_CLASSES}), got {label}")
    out = torch.full((BLOCK_SIZE, BLOCK_SIZE), -1, dtype=torch.int64)
    for i, (r, c, h, w) in enumerate(PARTITION_RECTS[int(label)]):
        out[r:r + h, c:c + w] = i
    return out


# Label permutations under the block transforms (index = old label, value = new label). hflip flips
# left-right, vflip flips up-down, transpose swaps rows and columns. tests/test_data.py derives each
# table from the geometry above, so a wrong entry fails there.
HFLIP_LABELS = torch.tensor([NONE, HORZ, VERT, SPLIT, HORZ_A, HORZ_B, VERT_B, VERT_A, HORZ_4, VERT_4])
VFLIP_LABELS = torch.tensor([NONE, HORZ, VERT, SPLIT, HORZ_B, HORZ_A, VERT_A, VERT_B, HORZ_4, VERT_4])
TRANSPOSE_LABELS = torch.tensor([NONE, VERT, HORZ, SPLIT, VERT_A, VERT_B, HORZ_A, HORZ_B, VERT_4, HORZ_4])

# ---------------------------------------------------------------------------------------------------
# Cascade stage targets. Stage 1: NONE=0 | PARTITION=1. Stage 2 (partitioned blocks): SPLIT=0 | RECT=1
# | AB=2. Stage 3-RECT: HORZ=0 | VERT=1 (| HORZ_4=2 | VERT_4=3 in 4-way data). Stage 3-AB: HORZ_A=0 |
# HORZ_B=1 | VERT_A=2 | VERT_B=3. A label that never reaches a stage gets IGNORE_INDEX there, the
# default ignore_index of F.cross_entropy and fastcascade.softmax_focal_loss.
# ---------------------------------------------------------------------------------------------------
STAGES = ("stage1", "stage2", "rect", "ab")
STAGE_CLASS_NAMES = {
    "stage1": ("NONE", "PARTITION"),
    "stage2": ("SPLIT", "RECT", "AB"),
    "rect": ("HORZ", "VERT", "HORZ_4", "VERT_4"),
    "ab": ("HORZ_A", "HORZ_B", "VERT_A", "VERT_B"),
}
_I = IGNORE_INDEX
# Row = final label, columns = (stage1, stage2, rect, ab).
_STAGE_TABLE = torch.tensor([
    [0, _I, _I, _I],  # NONE
    [1, 1, 0, _I],    # HORZ
    [1, 1, 1, _I],    # VERT
    [1, 0, _I, _I],   # SPLIT
    [1, 2, _I, 0],    # HORZ_A
    [1, 2, _I, 1],    # HORZ_B
    [1, 2, _I, 2],    # VERT_A
    [1, 2, _I, 3],    # VERT_B
    [1, 1, 2, _I],    # HORZ_4
    [1, 1, 3, _I],    # VERT_4
])
_RECT_TO_LABEL = torch.tensor([HORZ, VERT, HORZ_4, VERT_4])
_AB_TO_LABEL = torch.tensor([HORZ_A, HORZ_B, VERT_A, VERT_B])


def check_labels(labels: torch.Tensor, name: str = "labels") -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32, torch.int16,
                                                                       torch.uint8, torch.int8):
        raise ValueError(f"{name}: expected an integer tensor, got "
                         f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"{name}: expected values in [0, {NUM_CLASSES}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return labels.long()


def stage_targets(labels: torch.Tensor) -> dict:
    """Per-stage targets of final labels: {"stage1", "stage2", "rect", "ab"} -> int64 tensors shaped like
    ``labels``, IGNORE_INDEX where the label does not reach that stage."""
    labels = check_labels(labels)
    table = _STAGE_TABLE.to(labels.device)[labels]
    return {stage: table[..., i] for i, stage in enumerate(STAGES)}


def labels_from_stages(stage1: torch.Tensor, stage2: torch.Tensor, rect: torch.Tensor,
                       ab: torch.Tensor) -> torch.Tensor:
    """Final labels from per-stage decisions (the inverse of :func:`stage_targets`): NONE where stage1
    is 0, else SPLIT / the rect class / the ab class as stage2 says. Entries of a stage that a sample
    does not reach are not read (they may hold IGNORE_INDEX or anything else); a reached stage holding
    a value outside its classes raises ValueError."""
    stage1, stage2, rect, ab = torch.broadcast_tensors(*map(torch.as_tensor, (stage1, stage2, rect, ab)))
    part = stage1 != 0
    checks = (("stage1", stage1, torch.ones_like(part), 2), ("stage2", stage2, part, 3),
              ("rect", rect, part & (stage2 == 1), 4), ("ab", ab, part & (stage2 == 2), 4))
    for name, values, reached, n in checks:
        bad = reached & ((values < 0) | (values >= n))
        if bad.any():
            raise ValueError(f"{name}: expected values in [0, {n}) where that stage is reached, got "
                             f"{int(values[bad].flatten()[0])}")
    dev = stage1.device
    rect_label = _RECT_TO_LABEL.to(dev)[rect.long().clamp(0, 3)]
    ab_label = _AB_TO_LABEL.to(dev)[ab.long().clamp(0, 3)]
    out = torch.where(stage2 == 0, torch.full_like(rect_label, SPLIT),
                      torch.where(stage2 == 1, rect_label, ab_label))
    return torch.where(stage1 == 0, torch.full_like(out, NONE), out)
