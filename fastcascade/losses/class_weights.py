"""Per-class weights from class counts, for the weight argument of the softmax focal and Dice + focal
losses (and fit's class-balanced sampler)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._checks import number_arg

__all__ = ["class_balanced_weights", "inverse_frequency_weights"]


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
    """Effective-number class weights (Cui et al., CVPR 2019):

        w_c = (1 - beta) / (1 - beta ** n_c),   then scaled so that sum_c w_c = C

    A class with zero count gets weight 0. beta = 0 weighs every present class equally; beta -> 1
    approaches inverse frequency.

    Args:
        counts: (C,) per-class counts (ints or finite floats >= 0, at least one > 0).
        beta: in [0, 1).
    Returns: float32 (C,) on counts' device.
    Raises: ValueError for beta outside [0, 1) or counts that are not a non-empty 1-D real sequence of
        finite values >= 0 with one > 0.
    """
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    n = _counts_tensor(counts)
    # 1 - beta^n = -expm1(n log beta): exact for beta close to 1, where 1 - beta**n cancels.
    effective = -torch.expm1(n * math.log(beta)) if beta > 0 else torch.ones_like(n)
    raw = torch.where(n > 0, (1 - beta) / effective.clamp(min=1e-300), torch.zeros_like(n))
    return (raw * (n.numel() / raw.sum())).to(torch.float32)


def inverse_frequency_weights(counts: torch.Tensor | Sequence[float], power: float = 0.5) -> torch.Tensor:
    """Inverse-frequency class weights:

        w_c = n_c ** -power,   then scaled so that sum_c w_c = C

    power 0.5 is the "inverse sqrt" weighting of segmentation practice, 1.0 plain inverse frequency.
    Zero-count classes get 0.

    Args:
        counts: (C,) per-class counts, as for class_balanced_weights.
        power: a finite number >= 0.
    Returns: float32 (C,) on counts' device.
    Raises: ValueError (TypeError for a non-number power) for a negative or non-finite power, or counts
        as for class_balanced_weights.
    """
    power = number_arg(power, "power", 0)
    n = _counts_tensor(counts)
    raw = torch.where(n > 0, n.clamp(min=1) ** -power, torch.zeros_like(n))
    return (raw * (n.numel() / raw.sum())).to(torch.float32)
