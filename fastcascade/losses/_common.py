"""Argument checks shared by the focal and Dice + focal losses: they run before any kernel."""

from __future__ import annotations

import torch

from .. import _ops
from .._checks import number_arg

__all__ = ["check_class_target", "check_common", "class_weight_backend", "need_grad"]

PROB_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_common(logits, gamma: float, label_smoothing: float, reduction: str) -> None:
    """logits: a floating-point tensor; gamma >= 0; label_smoothing in [0, 1); reduction a known name."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    number_arg(gamma, "gamma", 0)
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if reduction not in _ops.REDUCTION_CODES:
        raise ValueError(f"reduction must be one of {tuple(_ops.REDUCTION_CODES)}, got {reduction!r}")


def check_class_target(target, logits: torch.Tensor, probabilities: bool = False) -> None:
    """target: an int64 tensor of class ids on the logits' device (or, with probabilities=True, also a
    float tensor of class probabilities)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if probabilities and target.dtype in PROB_DTYPES:
        pass
    elif probabilities and target.dtype != torch.int64:
        raise ValueError(f"target must hold int64 class indices or float class probabilities, got dtype "
                         f"{target.dtype} (try target.long() or target.float())")
    elif target.dtype != torch.int64:
        raise ValueError(f"target must hold int64 class indices, got dtype {target.dtype} (try target.long())")
    if target.device != logits.device:
        raise ValueError(f"logits and target must be on the same device, got {logits.device} and {target.device}")


def need_grad(logits: torch.Tensor) -> bool:
    """Whether the fused op should write d loss / d logits in its forward pass."""
    return logits.requires_grad and torch.is_grad_enabled()


def class_weight_backend(weight, C: int, logits: torch.Tensor, backend: str) -> str:
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
