"""Dice + softmax focal loss for segmentation, fused, and its nn.Module form."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .. import _ops, reference
from .._checks import value_checks_on
from ._common import check_class_target, check_common, class_weight_backend

__all__ = ["dice_focal_loss", "DiceFocalLoss"]


def dice_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    gamma: float = 2.0,
    lambda_dice: float = 0.5,
    lambda_focal: float = 0.5,
    smooth: float = 1.0,
    include_background: bool = True,
    ignore_index: int | None = None,
    batch_dice: bool = True,
    reduction: str = "mean",
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Dice + softmax focal loss for segmentation, fused: loss = lambda_dice * dice + lambda_focal * focal.

    With p = softmax(logits, dim=1) and y = one-hot(target), pixels whose target is ignore_index
    counting in neither term:

        focal  = softmax_focal_loss(logits, target, gamma, weight, ignore_index)   ("mean": / sum_i w_{t_i})
        I_c    = sum p_c y_c,   S_c = sum p_c + sum y_c     (over batch and pixels if batch_dice, else per image)
        dice_c = 1 - (2 I_c + smooth) / (S_c + smooth)
        dice   = sum_c w_c dice_c / sum_c w_c    (w = weight or ones; class 0 left out when
                                                  include_background=False; mean over images if not batch_dice)

    A term whose lambda is 0 is left out. include_background=False leaves class 0 out of the Dice term
    only (the softmax still runs over all C classes). One pass over the logits gives the loss and the
    per-image, per-class sums; backward is one more pass that recomputes the softmax and writes
    d loss / d logits. No per-pixel tensor besides the gradient. Deterministic; fp32 accumulation for
    fp16/bf16 logits.

    Args:
        logits: (B, C, *spatial), e.g. (B, C, H, W), at least one spatial dim, C >= 1;
            float16/bfloat16/float32/float64. Channels-last and other non-contiguous layouts are copied
            to contiguous first.
        target: int64 (B, *spatial) class indices in [0, C), or ignore_index; on the logits' device.
        weight: optional float (C,) class weights, finite and >= 0, shared by both terms (constants: no
            gradient).
        gamma, lambda_dice, lambda_focal, smooth: finite numbers >= 0.
        ignore_index: an int or None.
        reduction: only "mean": the loss is a 0-dim tensor (the Dice term is a ratio of sums).
        backend: "auto" | "cpu" | "cuda" | "triton" | "torch" (the pure-PyTorch reference).
    Returns: a 0-dim tensor (NaN for an empty batch, as torch's "mean" over nothing).
    Raises: TypeError when logits or target is not a tensor; ValueError, naming the argument, for
        non-float logits, fewer than 3 dims, a target of another dtype, shape or device, a weight not of
        shape (C,), not float, elsewhere or requiring grad (fused backends), a negative or non-finite
        lambda, smooth or gamma, include_background=False with C < 2, a non-int ignore_index, or
        reduction != "mean". A target outside [0, C) (other than ignore_index) or a negative or
        non-finite weight raises on the CPU; on CUDA the values are not read back to the host, and the
        loss (and gradient) is NaN instead (FASTCASCADE_CHECK=1 raises).
    How it compares with MONAI's DiceFocalLoss, term by term: docs/comparisons.md.
    """
    backend, weight_bad = _check_args(logits, target, weight, gamma, lambda_dice, lambda_focal, smooth,
                                      include_background, ignore_index, reduction, backend)
    B, C = logits.shape[:2]
    if backend == "torch":
        loss = reference.dice_focal_loss(logits, target, weight, gamma, lambda_dice, lambda_focal, smooth,
                                         include_background, ignore_index, batch_dice)
    elif B == 0:  # torch's "mean" over nothing (F.cross_entropy on an empty batch): NaN, an empty gradient
        loss = logits.sum() * float("nan")
    else:
        # The op takes (B, C, S) planes; reshape copies only what is not contiguous already.
        x, t = logits.reshape(B, C, -1), target.reshape(B, -1)
        op = _ops.op("dice_focal", backend)
        loss, _, _, _ = op(x, t, weight, float(gamma), float(smooth), float(lambda_dice), float(lambda_focal),
                           _ops.NO_IGNORE_INDEX if ignore_index is None else int(ignore_index),
                           bool(include_background), bool(batch_dice))
    if weight_bad is not None:  # weights not read back to the host (CUDA, compile): a bad one gives NaN
        loss = torch.where(weight_bad, torch.full_like(loss, float("nan")), loss)
    return loss


def _check_args(logits, target, weight, gamma, lambda_dice, lambda_focal, smooth, include_background,
                ignore_index, reduction, backend) -> tuple[str, torch.Tensor | None]:
    """Checks dice_focal_loss's arguments; returns (the resolved backend, a 0-dim bool tensor that is True
    when a weight is negative or not finite, or None when the weights were checked on the host)."""
    check_common(logits, gamma, 0.0, reduction)
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' for dice_focal_loss (the Dice term is a ratio of sums; "
                         f"no per-pixel loss exists), got {reduction!r}")
    check_class_target(target, logits)
    if logits.dim() < 3:
        raise ValueError(f"logits must be (B, C, *spatial) with at least one spatial dim, got shape "
                         f"{tuple(logits.shape)}")
    B, C = logits.shape[:2]
    if C == 0:
        raise ValueError(f"logits must have at least one class along dim 1, got shape {tuple(logits.shape)}")
    expected = (B,) + tuple(logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(f"target must have shape {expected} for logits {tuple(logits.shape)}, got {tuple(target.shape)}")
    for name, v in (("lambda_dice", lambda_dice), ("lambda_focal", lambda_focal), ("smooth", smooth)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if not include_background and C < 2:
        raise ValueError(f"include_background=False needs at least 2 classes (class 0 is left out), got C = {C}")
    if ignore_index is not None and not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int or None, got {ignore_index!r}")
    backend = class_weight_backend(weight, C, logits, backend)
    # Dice's sum_c w_c dice_c / sum_c w_c is a weighted mean only for weights >= 0 (MONAI refuses
    # negative ones too); softmax_focal_loss alone keeps F.cross_entropy's rule and accepts them.
    weight_bad = None
    if weight is not None:
        weight_bad = ~(torch.isfinite(weight) & (weight >= 0)).all()
        if value_checks_on(weight):
            if bool(weight_bad):
                raise ValueError(f"weight must be finite and >= 0 for dice_focal_loss (the Dice term is a "
                                 f"weighted mean over classes), got {weight.tolist()}")
            weight_bad = None
    if value_checks_on(target):
        bad = (target < 0) | (target >= C)
        if ignore_index is not None:
            bad &= target != ignore_index
        if bool(bad.any()):
            raise ValueError(f"target holds class indices outside [0, {C}) (ignore_index={ignore_index}): "
                             f"{target[bad].unique()[:8].tolist()}")
    return backend, weight_bad


class DiceFocalLoss(nn.Module):
    """Module form of dice_focal_loss; `weight` is a buffer (moves with .to())."""

    def __init__(self, weight: torch.Tensor | Sequence[float] | None = None, gamma: float = 2.0,
                 lambda_dice: float = 0.5, lambda_focal: float = 0.5, smooth: float = 1.0,
                 include_background: bool = True, ignore_index: int | None = None, batch_dice: bool = True,
                 reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.gamma, self.lambda_dice, self.lambda_focal, self.smooth = gamma, lambda_dice, lambda_focal, smooth
        self.include_background, self.ignore_index, self.batch_dice = include_background, ignore_index, batch_dice
        self.reduction, self.backend = reduction, backend
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))
        if self.weight is not None and not bool((torch.isfinite(self.weight) & (self.weight >= 0)).all()):
            raise ValueError(f"weight must be finite and >= 0 for DiceFocalLoss (the Dice term is a weighted mean "
                             f"over classes), got {self.weight.tolist()}")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dice_focal_loss(logits, target, self.weight, self.gamma, self.lambda_dice, self.lambda_focal,
                               self.smooth, self.include_background, self.ignore_index, self.batch_dice,
                               self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"gamma={self.gamma}, lambda_dice={self.lambda_dice}, lambda_focal={self.lambda_focal}, "
                f"smooth={self.smooth}, include_background={self.include_background}, "
                f"ignore_index={self.ignore_index}, batch_dice={self.batch_dice}")
