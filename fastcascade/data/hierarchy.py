"""The seed hierarchy as a fastcascade.Cascade: Stage 1 NONE | PARTITION, Stage 2 SPLIT | RECT | AB, the
RECT specialist (HORZ | VERT) and the AB ensemble (HORZ_A | HORZ_B | VERT_A | VERT_B), labels in libaom's
order, every branch named for the evaluation reports."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..cascade import Argmax, Cascade, Ensemble, Stage, Threshold
from .labels import (
    HORZ,
    HORZ_A,
    HORZ_B,
    LABEL_NAMES,
    NONE,
    SPLIT,
    STAGE_CLASS_NAMES,
    STAGES,
    VERT,
    VERT_A,
    VERT_B,
)

__all__ = ["av1_partition_cascade"]


def av1_partition_cascade(stage1: nn.Module, stage2: nn.Module, rect: nn.Module, ab_members: Sequence[nn.Module],
                          threshold: float = 0.5, temperature: float = 1.0, vote: str = "hard",
                          backend: str = "auto", trunk: nn.ModuleDict | nn.Sequential | None = None,
                          taps: dict[str, str] | None = None) -> Cascade:
    """The seed hierarchy: stage1 (one logit: PARTITION if sigmoid(logit / temperature) > threshold, else
    NONE exits); stage2 (3 logits [SPLIT, RECT, AB]; SPLIT exits); rect (2 logits [HORZ, VERT]);
    ab_members (each 4 logits [HORZ_A, HORZ_B, VERT_A, VERT_B]) vote ("hard" or "soft"). Final labels
    are libaom's ids (NONE=0 ... VERT_B=7) and the cascade's class_names are their names. With a trunk,
    taps maps stage names ("stage1", "stage2", "rect", "ab") to the segment each one's module reads (the
    others read the input)."""
    taps = dict(taps or {})
    unknown = sorted(set(taps) - set(STAGES))
    if unknown:
        raise ValueError(f"taps: unknown stages {unknown}; the hierarchy's stages are {', '.join(STAGES)}")
    ab = Ensemble(ab_members, [HORZ_A, HORZ_B, VERT_A, VERT_B], mode=vote, name="ab", tap=taps.get("ab"),
                  class_names=STAGE_CLASS_NAMES["ab"])
    rect_stage = Stage(rect, Argmax(), [HORZ, VERT], name="rect", tap=taps.get("rect"),
                       branch_names=STAGE_CLASS_NAMES["rect"][:2])
    s2 = Stage(stage2, Argmax(), [SPLIT, rect_stage, ab], name="stage2", tap=taps.get("stage2"),
               branch_names=STAGE_CLASS_NAMES["stage2"])
    s1 = Stage(stage1, Threshold(threshold, temperature), [NONE, s2], name="stage1", tap=taps.get("stage1"),
               branch_names=STAGE_CLASS_NAMES["stage1"])
    return Cascade(s1, trunk=trunk, backend=backend, class_names=LABEL_NAMES[:VERT_B + 1])
