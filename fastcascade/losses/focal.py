"""Sigmoid and softmax focal losses (Lin et al. 2017), fused: functions mirroring torch.nn.functional and
their nn.Module forms.

Each function checks its arguments before any kernel runs, then calls one fused op that reads the inputs
once and, when a gradient is needed, writes d loss / d logits in the same pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .. import _ops, reference
from .._checks import number_arg, value_checks_on
from ._common import check_class_target, check_common, class_weight_backend, need_grad
from .class_weights import class_balanced_weights

__all__ = ["sigmoid_focal_loss", "softmax_focal_loss", "FocalLoss", "SoftmaxFocalLoss", "ClassBalancedFocalLoss"]

_TARGET_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool, torch.uint8)


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
    """Sigmoid (per-element binary) focal loss (Lin et al. 2017), fused.

    With p = sigmoid(x), t the target smoothed as t (1 - eps) + eps / 2 (eps = label_smoothing),
    ce = BCE-with-logits(x, t), p_t = p t + (1 - p)(1 - t) and alpha_t = alpha t + (1 - alpha)(1 - t):

        loss = alpha_t * ce * (1 - p_t) ** gamma      (no alpha_t when alpha is None or < 0)

    Args:
        logits: float tensor of any shape (float16, bfloat16, float32, float64).
        targets: same shape and device; float in [0, 1] (soft targets allowed), bool or uint8 (0 or 1).
            A target outside [0, 1] (or NaN) is invalid: it raises on the CPU; on CUDA that element's
            loss and gradient are NaN (checking would sync the host), and FASTCASCADE_CHECK=1 raises.
        alpha: None, < 0 (off) or <= 1. gamma: >= 0. label_smoothing: eps in [0, 1).
        reduction: "none" (same shape as logits) | "mean" (over all elements) | "sum" (0-dim).
        num_positives: divide the summed loss by this (a number > 0 or a one-element tensor on the
            logits' device, RetinaNet style); needs reduction="mean" and replaces its element count.
            No host sync.
        hard_negative_ratio: keep every positive (target >= 0.5) and only the hardest negatives,
            ratio:1 to the positives (e.g. 3.0), chosen on the device. "mean" then averages over the
            kept elements (0 when none is kept) and "none" zeroes the dropped ones.
        backend: "auto" | "cpu" | "cuda" | "triton" | "torch" (the pure-PyTorch reference).
    Raises: TypeError when logits or targets is not a tensor; ValueError, naming the argument, for
        non-float logits, targets of another shape, dtype or device, alpha > 1, gamma < 0, eps outside
        [0, 1), an unknown reduction, num_positives with reduction != "mean" or <= 0,
        hard_negative_ratio < 0, targets that require grad (fused backends), and targets outside
        [0, 1] (on CUDA with FASTCASCADE_CHECK=1 only).
    How it compares with torchvision.ops.sigmoid_focal_loss: docs/comparisons.md.
    """
    check_common(logits, gamma, label_smoothing, reduction)
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
    if targets.dtype != torch.bool and targets.numel() and value_checks_on(targets):
        lo, hi = torch.aminmax(targets)
        if not (bool(lo >= 0) and bool(hi <= 1)):  # NaN fails both
            raise ValueError(f"targets must lie in [0, 1] (soft targets allowed), got values in "
                             f"[{lo.item()}, {hi.item()}]")

    # The reduction that the kernel does; mining and num_positives reduce afterwards.
    inner = "none" if hard_negative_ratio is not None else ("sum" if num_positives is not None else reduction)
    if backend == "torch":
        loss = reference.sigmoid_focal_loss(logits, targets, alpha, gamma, inner, label_smoothing)
    else:
        if not _same_dense_layout(logits, targets):
            logits, targets = logits.contiguous(), targets.contiguous()
        loss, _, _ = _ops.op("sigmoid_focal", backend)(
            logits, targets, -1.0 if alpha is None else float(alpha), float(gamma), float(label_smoothing),
            _ops.REDUCTION_CODES[inner], need_grad(logits),
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
    """Multi-class (softmax) focal loss over dim 1, fused, with F.cross_entropy's conventions.

        loss_i = -sum_c q_ic * w_c * (1 - p_ic) ** gamma * log p_ic,   p = softmax(logits, dim=1)

    target holds either class indices t (int64), with q_ic = (1 - eps) [c == t_i] + eps / C: rows
    whose target is ignore_index give 0 and do not count, and "mean" divides the sum by
    sum_i w_{t_i} over the kept rows; or class probabilities r (floating, the logits' shape: mixup,
    soft labels), with q_ic = (1 - eps) r_ic + eps / C: ignore_index does not apply, and "mean"
    divides the sum by the number of rows (N d1 ...), not by a weight sum. gamma = 0 gives
    F.cross_entropy's value and gradient in both forms.

    Args:
        logits: (N, C), (N, C, d1, ...) or unbatched (C,); float16/bfloat16/float32/float64; C >= 1.
        target: on the logits' device, either int64 class indices in [0, C) or ignore_index, of shape
            (N,), (N, d1, ...) or () for unbatched logits; or float16/bfloat16/float32/float64 class
            probabilities of the logits' shape, each row (along dim 1) >= 0 and summing to 1 within
            fastcascade.reference.probability_tolerance (1e-3; 1e-2 for 16-bit targets).
        weight: optional float (C,) per-class weights on the logits' device; negative ones are
            accepted, as F.cross_entropy does (dice_focal_loss refuses them).
        gamma: >= 0. label_smoothing: eps in [0, 1).
        reduction: "none" (target's shape) | "mean" | "sum" (0-dim).
        backend: "auto" | "cpu" | "cuda" | "triton" | "torch" (the pure-PyTorch reference).
    Raises: TypeError when logits or target is not a tensor; ValueError, naming the argument, for
        non-float logits, a target of another dtype, shape or device, a weight not of shape (C,), not
        float, elsewhere, or requiring grad (fused backends), gamma < 0, eps outside [0, 1) or an
        unknown reduction. A target outside [0, C) (other than ignore_index), or a probability row
        that is not a distribution, raises on the CPU; on CUDA its row gives NaN (never a memory
        fault, no host sync), and FASTCASCADE_CHECK=1 raises instead.
    """
    check_common(logits, gamma, label_smoothing, reduction)
    check_class_target(target, logits, probabilities=True)
    if target.is_floating_point():
        return _softmax_focal_probs(logits, target, gamma, weight, label_smoothing, reduction, backend)
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
    backend = class_weight_backend(weight, C, logits, backend)
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
            _ops.REDUCTION_CODES[reduction], need_grad(logits),
        )
        if reduction == "none":
            loss = loss.view(target.shape)
    if unbatched and reduction == "none":
        loss = loss.squeeze(0)
    return loss


def _softmax_focal_probs(logits, target, gamma, weight, label_smoothing, reduction, backend):
    """softmax_focal_loss with class-probability targets (checked as far as dtype and device)."""
    if target.shape != logits.shape:
        raise ValueError(f"target of class probabilities must have the logits' shape {tuple(logits.shape)}, "
                         f"got {tuple(target.shape)}")
    unbatched = logits.dim() == 1
    if unbatched:
        logits, target = logits.unsqueeze(0), target.unsqueeze(0)
    C = logits.shape[1]
    if C == 0:
        raise ValueError(f"logits must have at least one class along dim 1, got shape {tuple(logits.shape)}")
    backend = class_weight_backend(weight, C, logits, backend)
    if backend != "torch" and target.requires_grad:
        raise ValueError("target.requires_grad: the fused loss treats target probabilities as constants; use "
                         "backend='torch'")
    if target.numel() and value_checks_on(target):
        _check_distributions(target)

    if backend == "torch":
        loss = reference.softmax_focal_loss(logits, target, gamma, weight, -100, label_smoothing, reduction)
    else:
        # The op takes (N, C) rows or (N, C, S) planes; channels-last logits become rows without a copy.
        if logits.dim() > 2 and logits.movedim(1, -1).is_contiguous():
            x, t = logits.movedim(1, -1).reshape(-1, C), target.movedim(1, -1).reshape(-1, C)
        elif logits.dim() > 2:
            x, t = logits.reshape(logits.shape[0], C, -1), target.reshape(target.shape[0], C, -1)
        else:
            x, t = logits, target
        loss, _, _ = _ops.op("softmax_focal", backend)(
            x, t, weight, float(gamma), float(label_smoothing), _ops.NO_IGNORE_INDEX,
            _ops.REDUCTION_CODES[reduction], need_grad(logits),
        )
        if reduction == "none":
            loss = loss.view((logits.shape[0],) + tuple(logits.shape[2:]))
    if unbatched and reduction == "none":
        loss = loss.squeeze(0)
    return loss


def _check_distributions(target: torch.Tensor) -> None:
    """Every row of target (along dim 1) >= 0 and summing to 1 within probability_tolerance."""
    tol = reference.probability_tolerance(target.dtype)
    acc = torch.float64 if target.dtype == torch.float64 else torch.float32
    total = target.sum(1, dtype=acc)
    # the common case in two cheap reductions (NaN fails both); the row-wise search only to word the error
    if bool(target.amin() >= 0) and bool((total - 1).abs().amax() <= tol):
        return
    r = target.to(acc)
    bad = ~((r >= 0).all(1) & ((total - 1).abs() <= tol))
    if bool(bad.any()):
        first = bad.nonzero()[0].tolist()
        row = (first[0], slice(None), *first[1:])
        raise ValueError(f"target holds class probabilities whose rows along dim 1 are not distributions (every "
                         f"entry >= 0, summing to 1 within {tol}): {int(bad.sum())} bad row(s), the first at "
                         f"{tuple(first)} sums to {total[tuple(first)].item():.6g} with smallest entry "
                         f"{r[row].min().item():.6g}")


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
