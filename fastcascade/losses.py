"""Fused focal losses: functions mirroring torch.nn.functional, and nn.Module wrappers.

Every function validates its arguments before any kernel runs, then calls one fused op that
reads the inputs once and, when a gradient is needed, writes d loss / d logits in the same pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from . import _ops, reference
from ._checks import checks_forced, number_arg, value_checks_on

__all__ = [
    "sigmoid_focal_loss",
    "softmax_focal_loss",
    "class_balanced_weights",
    "inverse_frequency_weights",
    "FocalLoss",
    "SoftmaxFocalLoss",
    "ClassBalancedFocalLoss",
    "dice_focal_loss",
    "DiceFocalLoss",
]

_TARGET_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool, torch.uint8)


def _check_common(logits, gamma: float, label_smoothing: float, reduction: str) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    number_arg(gamma, "gamma", 0)
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if reduction not in _ops.REDUCTION_CODES:
        raise ValueError(f"reduction must be one of {tuple(_ops.REDUCTION_CODES)}, got {reduction!r}")


def _check_class_target(target, logits: torch.Tensor) -> None:
    """target: an int64 tensor of class ids on the logits' device."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype != torch.int64:
        raise ValueError(f"target must hold int64 class indices, got dtype {target.dtype} (try target.long())")
    if target.device != logits.device:
        raise ValueError(f"logits and target must be on the same device, got {logits.device} and {target.device}")


def _need_grad(logits: torch.Tensor) -> bool:
    return logits.requires_grad and torch.is_grad_enabled()


def _same_dense_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Both dense in one memory order: the ops then walk them as flat memory, whatever the layout."""
    if any(n > 1 and sa != sb for n, sa, sb in zip(a.shape, a.stride(), b.stride())):
        return False
    if not any(b.is_contiguous(memory_format=f) for f in _formats(b)):
        return False
    return any(a.is_contiguous(memory_format=f) for f in _formats(a))


def _formats(t: torch.Tensor):
    return {4: (torch.contiguous_format, torch.channels_last), 5: (torch.contiguous_format, torch.channels_last_3d)}.get(
        t.dim(), (torch.contiguous_format,))


# ---------------------------------------------------------------------------------------------
# sigmoid focal


def sigmoid_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    num_positives: torch.Tensor | float | None = None,
    hard_negative_ratio: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017), torchvision.ops.sigmoid_focal_loss semantics, fused.

    With p = sigmoid(x), t the target smoothed as t (1 - eps) + eps / 2 (eps = label_smoothing),
    ce = BCE-with-logits(x, t), p_t = p t + (1 - p)(1 - t) and alpha_t = alpha t + (1 - alpha)(1 - t):

        loss = alpha_t * ce * (1 - p_t) ** gamma      (no alpha_t when alpha is None or < 0)

    Args:
        logits: float tensor of any shape (float16, bfloat16, float32, float64).
        targets: same shape; float in [0, 1] (soft targets allowed), bool or uint8.
        reduction: "none" (same shape as logits) | "mean" (over all elements) | "sum".
        num_positives: divide the summed loss by this (a float or a device tensor, RetinaNet style);
            needs reduction="mean" and replaces its element count. No host sync.
        hard_negative_ratio: keep every positive (target >= 0.5) and only the hardest negatives,
            ratio:1 to the positives (e.g. 3.0), chosen on the device. "mean" then averages over the
            kept elements (0 when none is kept) and "none" zeroes the dropped ones.
        backend: "auto" | "cpu" | "cuda" | "triton" | "torch" (the pure-PyTorch reference).
    """
    _check_common(logits, gamma, label_smoothing, reduction)
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in _TARGET_DTYPES:
        raise ValueError(f"targets must be float, bool or uint8, got dtype {targets.dtype} (try targets.float())")
    if targets.shape != logits.shape:
        raise ValueError(f"targets must have the same shape as logits {tuple(logits.shape)}, got {tuple(targets.shape)}")
    if targets.device != logits.device:
        raise ValueError(f"logits and targets must be on the same device, got {logits.device} and {targets.device}")
    if alpha is not None and not alpha <= 1:
        raise ValueError(f"alpha must be <= 1 (None or < 0 disables it), got {alpha}")
    if num_positives is not None and reduction != "mean":
        raise ValueError(f"num_positives replaces the 'mean' normaliser: use reduction='mean', got {reduction!r}")
    if num_positives is not None:
        num_positives = _check_num_positives(num_positives, logits)
    if hard_negative_ratio is not None and not hard_negative_ratio >= 0:
        raise ValueError(f"hard_negative_ratio must be >= 0, got {hard_negative_ratio}")
    backend = _ops.resolve_backend(backend, logits.device)
    if backend != "torch" and targets.requires_grad:
        raise ValueError("targets.requires_grad: the fused loss treats targets as constants; use backend='torch'")
    if checks_forced() and not torch.compiler.is_compiling():
        if targets.is_floating_point() and bool(((targets < 0) | (targets > 1)).any()):
            raise ValueError("targets must lie in [0, 1]")

    # The reduction that the kernel does; mining and num_positives reduce afterwards.
    inner = "none" if hard_negative_ratio is not None else ("sum" if num_positives is not None else reduction)
    if backend == "torch":
        loss = reference.sigmoid_focal_loss(logits, targets, alpha, gamma, inner, label_smoothing)
    else:
        if not _same_dense_layout(logits, targets):
            logits, targets = logits.contiguous(), targets.contiguous()
        loss, _, _ = _ops.op("sigmoid_focal", backend)(
            logits, targets, -1.0 if alpha is None else float(alpha), float(gamma), float(label_smoothing),
            _ops.REDUCTION_CODES[inner], _need_grad(logits),
        )
    if hard_negative_ratio is not None:
        loss = _hard_negative_reduce(loss, targets, hard_negative_ratio, reduction)
    if num_positives is not None:
        loss = loss / num_positives
    return loss


def _check_num_positives(num_positives, logits: torch.Tensor):
    """A number > 0, or a one-element real tensor on the logits' device (its value is not read: no host
    sync), as a 0-dim tensor so that the loss stays 0-dim."""
    if not isinstance(num_positives, torch.Tensor):
        return number_arg(num_positives, "num_positives", 0, low_inclusive=False)
    if num_positives.numel() != 1 or num_positives.dtype.is_complex or num_positives.dtype == torch.bool:
        raise ValueError(f"num_positives must be a scalar (a one-element real tensor or a number), got a "
                         f"{num_positives.dtype} tensor of shape {tuple(num_positives.shape)}")
    if num_positives.device != logits.device:
        raise ValueError(f"num_positives must be on the logits' device {logits.device}, got {num_positives.device}")
    return num_positives.reshape(())


def _hard_negative_reduce(loss: torch.Tensor, targets: torch.Tensor, ratio: float, reduction: str) -> torch.Tensor:
    """Keep positives and the ratio * num_positives highest-loss negatives; all on the device."""
    flat = loss.reshape(-1)
    pos = targets.reshape(-1) >= 0.5
    neg_loss = torch.where(pos, torch.full_like(flat, -math.inf), flat.detach())
    order = torch.argsort(neg_loss, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(flat.numel(), device=flat.device))
    keep = pos | (rank < torch.floor(pos.sum() * ratio))
    kept = flat * keep.to(flat.dtype)
    if reduction == "none":
        return kept.view_as(loss)
    if reduction == "sum":
        return kept.sum()
    return kept.sum() / keep.sum().clamp(min=1).to(flat.dtype)


# ---------------------------------------------------------------------------------------------
# softmax focal


def _class_weight_backend(weight, C: int, logits: torch.Tensor, backend: str) -> str:
    """Checks class weights (None or a float (C,) tensor on the logits' device) and resolves the
    backend: the fused losses treat the weights as constants, so weights that need a gradient refuse them."""
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or weight.shape != (C,) or not weight.is_floating_point():
            raise ValueError(f"weight must be a float tensor of shape ({C},), got "
                             f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
        if weight.device != logits.device:
            raise ValueError(f"weight must be on the logits' device {logits.device}, got {weight.device}")
    backend = _ops.resolve_backend(backend, logits.device)
    if backend != "torch" and weight is not None and weight.requires_grad:
        raise ValueError("weight.requires_grad: the fused loss treats class weights as constants; use backend='torch'")
    return backend


def softmax_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Multi-class focal loss over dim 1, fused; F.cross_entropy's conventions.

        loss_i = -sum_c q_ic * w_c * (1 - p_ic) ** gamma * log p_ic,   p = softmax(logits, dim=1),
        q_ic = (1 - eps) [c == t_i] + eps / C

    Rows whose target is ignore_index give 0 and do not count; "mean" divides the sum by
    sum_i w_{t_i} over the kept rows. gamma=0 is F.cross_entropy(logits, target, weight,
    ignore_index=ignore_index, label_smoothing=eps, reduction=reduction), value and gradient.

    Args:
        logits: (N, C), (N, C, d1, ...) or unbatched (C,); float16/bfloat16/float32/float64.
        target: int64 class indices, (N,), (N, d1, ...) or () for unbatched logits.
        weight: optional (C,) per-class weights; negative ones are accepted, as F.cross_entropy does
            (dice_focal_loss refuses them).
        reduction: "none" (target's shape) | "mean" | "sum".
    On CPU a target outside [0, C) (other than ignore_index) raises; on CUDA its row gives NaN
    (never a memory fault), and FASTCASCADE_CHECK=1 raises instead.
    """
    _check_common(logits, gamma, label_smoothing, reduction)
    _check_class_target(target, logits)
    unbatched = logits.dim() == 1
    if unbatched:
        logits, target = logits.unsqueeze(0), target.unsqueeze(0)
    if logits.dim() < 2:
        raise ValueError(f"logits must be (N, C), (N, C, d1, ...) or (C,), got shape {tuple(logits.shape)}")
    C = logits.shape[1]
    if C == 0:
        raise ValueError(f"logits must have at least one class along dim 1, got shape {tuple(logits.shape)}")
    expected = (logits.shape[0],) + tuple(logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(f"target must have shape {expected} for logits {tuple(logits.shape)}, got {tuple(target.shape)}")
    backend = _class_weight_backend(weight, C, logits, backend)
    if value_checks_on(target):
        bad = (target != ignore_index) & ((target < 0) | (target >= C))
        if bool(bad.any()):
            raise ValueError(f"target holds class indices outside [0, {C}) (ignore_index={ignore_index}): "
                             f"{target[bad].unique()[:8].tolist()}")

    if backend == "torch":
        loss = reference.softmax_focal_loss(logits, target, gamma, weight, ignore_index, label_smoothing, reduction)
    else:
        # The op takes (N, C) rows or (N, C, S) planes; channels-last inputs become rows without a copy.
        if logits.dim() > 2 and logits.movedim(1, -1).is_contiguous():
            x, t = logits.movedim(1, -1).reshape(-1, C), target.reshape(-1)
        elif logits.dim() > 2:
            x, t = logits.reshape(logits.shape[0], C, -1), target.reshape(target.shape[0], -1)
        else:
            x, t = logits, target
        loss, _, _ = _ops.op("softmax_focal", backend)(
            x, t, weight, float(gamma), float(label_smoothing), int(ignore_index),
            _ops.REDUCTION_CODES[reduction], _need_grad(logits),
        )
        if reduction == "none":
            loss = loss.view(target.shape)
    if unbatched and reduction == "none":
        loss = loss.squeeze(0)
    return loss


# ---------------------------------------------------------------------------------------------
# class weights


def _counts_tensor(counts) -> torch.Tensor:
    c = torch.as_tensor(counts)
    if c.dim() != 1 or c.numel() == 0:
        raise ValueError(f"counts must be a non-empty 1-D sequence of per-class counts, got shape {tuple(c.shape)}")
    if c.is_complex() or c.dtype == torch.bool:
        raise ValueError(f"counts must be real per-class counts, got dtype {c.dtype}")
    if c.is_floating_point() and not bool(torch.isfinite(c).all()):
        raise ValueError(f"counts must be finite, got {c.tolist() if c.numel() <= 8 else 'NaN or inf values'}")
    if bool((c < 0).any()) or not bool((c > 0).any()):
        raise ValueError("counts must be >= 0 with at least one class present")
    return c.to(torch.float64)


def class_balanced_weights(counts: torch.Tensor | Sequence[float], beta: float = 0.9999) -> torch.Tensor:
    """Effective-number class weights (Cui et al., CVPR 2019): w_c = (1 - beta) / (1 - beta ** n_c),
    normalised to sum to the number of classes. A class with zero count gets weight 0.
    Returns float32 on counts' device."""
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    n = _counts_tensor(counts)
    # 1 - beta^n = -expm1(n log beta): exact for beta close to 1, where 1 - beta**n cancels.
    effective = -torch.expm1(n * math.log(beta)) if beta > 0 else torch.ones_like(n)
    raw = torch.where(n > 0, (1 - beta) / effective.clamp(min=1e-300), torch.zeros_like(n))
    return (raw * (n.numel() / raw.sum())).to(torch.float32)


def inverse_frequency_weights(counts: torch.Tensor | Sequence[float], power: float = 0.5) -> torch.Tensor:
    """w_c = n_c ** -power normalised to sum to the number of classes (power 0.5 is the "inverse sqrt"
    weighting of segmentation practice, 1.0 plain inverse frequency). Zero-count classes get 0."""
    power = number_arg(power, "power", 0)
    n = _counts_tensor(counts)
    raw = torch.where(n > 0, n.clamp(min=1) ** -power, torch.zeros_like(n))
    return (raw * (n.numel() / raw.sum())).to(torch.float32)


# ---------------------------------------------------------------------------------------------
# modules


class FocalLoss(nn.Module):
    """Module form of sigmoid_focal_loss."""

    def __init__(self, alpha: float | None = 0.25, gamma: float = 2.0, reduction: str = "mean",
                 label_smoothing: float = 0.0, hard_negative_ratio: float | None = None, backend: str = "auto"):
        super().__init__()
        self.alpha, self.gamma, self.reduction = alpha, gamma, reduction
        self.label_smoothing, self.hard_negative_ratio, self.backend = label_smoothing, hard_negative_ratio, backend

    def forward(self, logits: torch.Tensor, targets: torch.Tensor,
                num_positives: torch.Tensor | float | None = None) -> torch.Tensor:
        return sigmoid_focal_loss(logits, targets, self.alpha, self.gamma, self.reduction, self.label_smoothing,
                                  num_positives=num_positives, hard_negative_ratio=self.hard_negative_ratio,
                                  backend=self.backend)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"


class SoftmaxFocalLoss(nn.Module):
    """Module form of softmax_focal_loss; `weight` is a buffer (moves with .to())."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None, ignore_index: int = -100,
                 label_smoothing: float = 0.0, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.gamma, self.ignore_index, self.label_smoothing = gamma, ignore_index, label_smoothing
        self.reduction, self.backend = reduction, backend
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return softmax_focal_loss(logits, target, self.gamma, self.weight, self.ignore_index, self.label_smoothing,
                                  self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, reduction={self.reduction!r}, ignore_index={self.ignore_index}"


class ClassBalancedFocalLoss(SoftmaxFocalLoss):
    """Softmax focal loss weighted by class_balanced_weights(counts, beta) (Cui et al. 2019)."""

    def __init__(self, counts: torch.Tensor | Sequence[float], beta: float = 0.9999, gamma: float = 2.0,
                 ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean",
                 backend: str = "auto"):
        super().__init__(gamma, class_balanced_weights(counts, beta), ignore_index, label_smoothing, reduction,
                         backend)
        self.beta = beta


# ---------------------------------------------------------------------------------------------
# dice focal


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

    A term whose lambda is 0 is left out. One pass over the logits gives the loss and the per-image,
    per-class sums; backward is one more pass that recomputes the softmax and writes d loss / d logits.
    No per-pixel tensor besides the gradient. Deterministic; fp32 accumulation for fp16/bf16 logits.

    Args:
        logits: (B, C, *spatial), e.g. (B, C, H, W); float16/bfloat16/float32/float64. Channels-last and
            other non-contiguous layouts are copied to contiguous first.
        target: int64 (B, *spatial) class indices in [0, C), or ignore_index.
        weight: optional (C,) class weights >= 0, shared by both terms (constants: no gradient).
        reduction: only "mean" (the loss is a scalar; see below).
    On CPU a target outside [0, C) (other than ignore_index) raises; on CUDA it makes the loss and the
    gradient NaN (never a memory fault), and FASTCASCADE_CHECK=1 raises instead.

    Differences from MONAI's DiceFocalLoss(softmax=True, to_onehot_y=True) (checked in
    tests/test_dice_focal.py and tests/test_first_contact.py against monai 1.6):
      - MONAI's focal term is the sigmoid (per-channel binary) focal loss whatever `softmax` says; here it
        is the softmax focal loss. MONAI's FocalLoss(use_softmax=True, reduction="mean") sums over
        B*C*pixels elements and divides by their number, so without ignore_index and weights this focal
        term is C times it. With ignore_index, MONAI divides by the number of valid pixels (its mask has
        one channel), so the factor becomes 1: this term equals MONAI's. With weights, this one divides by
        sum_i w_{t_i} over the valid pixels (F.cross_entropy's rule) where MONAI divides by the count.
      - The Dice term equals MONAI's DiceLoss / DiceFocalLoss(lambda_focal=0) with
        smooth_nr = smooth_dr = smooth and batch = batch_dice (MONAI's defaults: 1e-5 and batch=False; here
        smooth=1 and batch_dice=True). MONAI weights as mean_c(w_c dice_c); here sum_c w_c dice_c /
        sum_c w_c: the same when the weights of the included classes sum to their number. When one class
        remains (C = 2 with include_background=False), MONAI's DiceLoss skips the weight (any value, even
        a negative one or of the wrong length) and its FocalLoss / DiceFocalLoss raise on a per-class
        weight; here w_1 dice_1 / w_1 = dice_1, the unweighted Dice, for any weight w_1 > 0.
      - Negative or non-finite weights are refused (MONAI refuses negative ones too): the Dice term is a
        weighted mean over classes. On the CPU this raises ValueError; on CUDA the weights are not read
        back to the host, and the loss is NaN instead (FASTCASCADE_CHECK=1 raises). softmax_focal_loss
        alone follows F.cross_entropy, which accepts negative weights.
      - include_background=False leaves class 0 out of the Dice term only (after the softmax over all C,
        as MONAI's Dice); MONAI also drops it from its focal term.
      - ignore_index: MONAI's DiceFocalLoss has none; MONAI's DiceLoss(ignore_index=...) masks like here,
        and its FocalLoss(ignore_index=...) as above.
      - lambda defaults are 0.5 / 0.5 (MONAI: 1.0 / 1.0); reduction="none" / "sum" (MONAI: per-element
        or per-(image, class) terms) are not offered: the fused op produces the scalar only.
      - gamma is the same; MONAI's alpha has no counterpart (use weight).
    """
    _check_common(logits, gamma, 0.0, reduction)
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' for dice_focal_loss (the Dice term is a ratio of sums; "
                         f"no per-pixel loss exists), got {reduction!r}")
    _check_class_target(target, logits)
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
    backend = _class_weight_backend(weight, C, logits, backend)
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
