"""Pure-PyTorch definitions of every fastcascade op: the semantics, and the test oracle.

Written for clarity, not speed. Every backend (C++ CPU, CUDA, Triton) is tested against these
functions; `backend="torch"` on the public API runs them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def sigmoid_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """torchvision.ops.sigmoid_focal_loss, with label smoothing t -> t (1 - eps) + eps / 2.

    p = sigmoid(x), ce = BCE-with-logits(x, t), p_t = p t + (1 - p)(1 - t),
    loss = alpha_t * ce * (1 - p_t)^gamma, alpha_t = alpha t + (1 - alpha)(1 - t)
    (no alpha term when alpha is None or negative).
    """
    t = targets.to(logits.dtype)
    t = t * (1 - label_smoothing) + 0.5 * label_smoothing
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha is not None and alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return _reduce(loss, reduction)


def softmax_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Multi-class focal loss over dim 1 of logits (N, C) or (N, C, d1, ...).

    loss_i = -sum_c q_ic w_c (1 - p_ic)^gamma log p_ic, p = softmax(logits, 1),
    q_ic = (1 - eps)[c == t_i] + eps / C. Rows with t_i == ignore_index give 0 and are dropped from
    the normaliser; "mean" divides the sum by sum_i w_{t_i} over kept rows (F.cross_entropy's rule).
    gamma = 0 is F.cross_entropy(logits, target, weight, ignore_index=..., label_smoothing=eps).
    """
    C = logits.shape[1]
    logp = torch.log_softmax(logits, dim=1)
    keep = target != ignore_index
    safe_t = torch.where(keep, target, torch.zeros_like(target))
    onehot = F.one_hot(safe_t, C).movedim(-1, 1).to(logp.dtype)
    q = (1 - label_smoothing) * onehot + label_smoothing / C
    w = torch.ones(C, dtype=logp.dtype, device=logp.device) if weight is None else weight.to(logp.dtype)
    w_b = w.view(1, C, *([1] * (logits.dim() - 2)))
    # 1 - p as -expm1(log p); the clamp keeps (1 - p)^gamma's gradient finite where p rounds to 1
    focal = (-torch.expm1(logp)).clamp(min=torch.finfo(logp.dtype).tiny) ** gamma
    loss = -(q * w_b * focal * logp).sum(1)
    loss = torch.where(keep, loss, torch.zeros_like(loss))
    if reduction == "mean":
        denom = torch.where(keep, w[safe_t], torch.zeros_like(loss)).sum()
        return loss.sum() / denom
    return _reduce(loss, reduction)
