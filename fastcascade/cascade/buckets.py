"""Row buckets: the row counts a cascade pads its nodes' calls to, so that a node meets few distinct shapes.

A node below the root receives however many rows its parent routes to it: a different count in nearly every
batch. On the CPU every new input shape of a convolution makes oneDNN build (and JIT-compile) a primitive, and
its cache keeps up to 1,024 of them (ONEDNN_PRIMITIVE_CACHE_CAPACITY), each holding buffers sized for its
shape: one 16->32-channel convolution on 16x16 maps called on 600 row counts grew the process by 1.8-3.2 GB
(14 MiB with the cache off; bench/row_buckets_check.py --memory 600), and in a process that runs many
cascades the cache thrashes (the demo timed two identical cascades 10% apart by their place in the round).
Padded to buckets, a node meets few shapes (72 up to 2,048 rows at 8 per doubling, against up to 2,048), for
at most 1 / per_octave more rows (ln 2 / (2 per_octave) on average: 4.3% at 8). CUDA's libraries cache plans
per shape too.

    row_bucket(100, 8) == 104   # n <= 2 per_octave: n; above: the next multiple of 2^floor(log2 n) / per_octave
"""

from __future__ import annotations

import math

import torch

__all__ = ["DEFAULT_ROW_BUCKETS", "expected_padded_rows", "row_bucket"]

DEFAULT_ROW_BUCKETS = 8


def row_bucket(n: int, per_octave: int) -> int:
    """The row count a call on n rows is padded to, with per_octave buckets per doubling (0: n itself)."""
    if per_octave <= 0 or n <= 2 * per_octave:
        return n
    step = max(1, (1 << (n.bit_length() - 1)) // per_octave)
    return -(-n // step) * step


def expected_padded_rows(rows: torch.Tensor, per_octave: int) -> torch.Tensor:
    """The mean padded row count of calls averaging `rows` rows (float64 tensor): rows itself up to
    2 * per_octave, above it rows * (1 + ln 2 / (2 per_octave)), the mean padding of counts spread over an
    octave (a count n is padded by about half a step, 2^floor(log2 n) / (2 per_octave))."""
    if per_octave <= 0:
        return rows
    return torch.where(rows > 2 * per_octave, rows * (1 + math.log(2) / (2 * per_octave)), rows)
