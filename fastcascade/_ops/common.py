"""Codes and small helpers shared by the op families' registrations and the public API."""

from __future__ import annotations

import torch

REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}
ADAPTER_ACTIVATION_CODES = {"relu": 0, "gelu": 1, "silu": 2}
VOTE_MODES = {"hard": 0, "soft": 1}
NO_IGNORE_INDEX = -(2**63)  # ignore_index=None: no int64 target equals it


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The accumulation dtype of an op on t: float64 for float64 inputs, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
