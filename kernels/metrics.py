"""Triton kernels for the metrics ops: the twins of csrc/metrics/ (same schemas, "_triton" suffix).

Ops defined with ``torch.library.triton_op`` in the ``fastcascade`` namespace:

* ``confusion_matrix_triton(pred, target, num_classes, ignore_index) -> int64 (C, C)``

Semantics: fastcascade.reference.confusion_matrix. Each element maps to its cell target * C + pred;
an element whose target is ignore_index or with an id outside [0, C) is masked out (skipped, no
sync: the Python API raises for those under FASTCASCADE_CHECK=1). Up to _MAX_HIST_BINS cells (C * C
rounded up to a power of two), a fixed grid of programs each histograms a contiguous run of tiles
(tl.histogram) into its own row of partial counts, and torch sums the rows in order. tl.histogram
costs each thread O(bins / 32 * log2(bins)) operations per element (ballots over the bits of the
bin index), so more cells take int64 atomics on the output instead. Both are exact integer counts:
bitwise reproducible.

Fake kernels are registered elsewhere (fastcascade/_ops/metrics.py).
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import launch, triton_op

__all__ = ["confusion_matrix_triton"]

_INDEX_DTYPES = (torch.int32, torch.int64)
_BLOCK = 1024            # elements per tile
_MAX_PROGRAMS = 1024     # programs of the histogram path (rows of partial counts)
_MAX_HIST_BINS = 1024    # C * C bins, rounded up to a power of two, of the histogram path (C <= 32)


@triton.jit
def _cells(pred_ptr, target_ptr, offs, N, C, ignore, HAS_IGNORE: tl.constexpr):
    """Each element's cell target * C + pred (0 where it counts nowhere), and whether it counts."""
    mask = offs < N
    t = tl.load(target_ptr + offs, mask=mask, other=0).to(tl.int64)
    p = tl.load(pred_ptr + offs, mask=mask, other=0).to(tl.int64)
    ok = mask & (t >= 0) & (t < C) & (p >= 0) & (p < C)
    if HAS_IGNORE:
        ok = ok & (t != ignore)
    return tl.where(ok, t * C + p, 0), ok


@triton.jit
def _confusion_hist_kernel(pred_ptr, target_ptr, partial_ptr, N, C, ignore, tiles_per_prog,
                           HAS_IGNORE: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([NB], tl.int64)
    for k in range(tiles_per_prog):
        offs = (pid * tiles_per_prog + k) * BLOCK + tl.arange(0, BLOCK)
        cell, ok = _cells(pred_ptr, target_ptr, offs, N, C, ignore, HAS_IGNORE)
        acc += tl.histogram(cell.to(tl.int32), NB, mask=ok).to(tl.int64)
    bins = tl.arange(0, NB)
    tl.store(partial_ptr + pid * (C * C) + bins, acc, mask=bins < C * C)


@triton.jit
def _confusion_atomic_kernel(pred_ptr, target_ptr, out_ptr, N, C, ignore, HAS_IGNORE: tl.constexpr,
                             BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cell, ok = _cells(pred_ptr, target_ptr, offs, N, C, ignore, HAS_IGNORE)
    tl.atomic_add(out_ptr + cell, tl.full([BLOCK], 1, tl.int64), mask=ok, sem="relaxed")


def _config(n: int, C: int):
    """(histogram path?, bins NB, programs, tiles per program) for n elements and C classes."""
    nb = max(32, triton.next_power_of_2(C * C))  # at least a bin per lane (tl.histogram pads to that anyway)
    tiles = triton.cdiv(n, _BLOCK)
    if nb > _MAX_HIST_BINS:
        return False, nb, tiles, 1
    tiles_per_prog = triton.cdiv(tiles, _MAX_PROGRAMS)
    return True, nb, triton.cdiv(tiles, tiles_per_prog), tiles_per_prog


@triton_op("fastcascade::confusion_matrix_triton")
def confusion_matrix_triton(pred: Tensor, target: Tensor, num_classes: int,
                            ignore_index: Optional[int]) -> Tensor:  # noqa: UP045 (torch's schema inference)
    for t, name in ((pred, "pred"), (target, "target")):
        if t.dtype not in _INDEX_DTYPES:
            raise RuntimeError(f"confusion_matrix_triton: {name} must be int32 or int64, got {t.dtype}")
    if pred.shape != target.shape:
        raise RuntimeError(f"confusion_matrix_triton: pred and target must have the same shape, got "
                           f"{tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.device != target.device:
        raise RuntimeError(f"confusion_matrix_triton: pred and target must be on the same device, got "
                           f"{pred.device} and {target.device}")
    if not 1 <= num_classes <= 46340:
        raise RuntimeError(f"confusion_matrix_triton: num_classes must be in [1, 46340], got {num_classes}")
    C, dev = num_classes, pred.device
    p, t = pred.contiguous().reshape(-1), target.contiguous().reshape(-1)
    n = p.shape[0]
    has_ignore = ignore_index is not None
    ignore = int(ignore_index) if has_ignore else 0
    if n == 0:
        return torch.zeros((C, C), dtype=torch.int64, device=dev)
    use_hist, nb, programs, tiles_per_prog = _config(n, C)
    if not use_hist:
        out = torch.zeros(C * C, dtype=torch.int64, device=dev)
        launch(_confusion_atomic_kernel, (programs,), p, t, out, n, C, ignore, HAS_IGNORE=has_ignore,
               BLOCK=_BLOCK)
        return out.view(C, C)
    partial = torch.empty((programs, C * C), dtype=torch.int64, device=dev)
    launch(_confusion_hist_kernel, (programs,),
           p, t, partial, n, C, ignore, tiles_per_prog, HAS_IGNORE=has_ignore, BLOCK=_BLOCK, NB=nb)
    return partial.sum(0).view(C, C)
