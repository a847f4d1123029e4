"""Triton kernels for the routing ops: the twins of csrc/routing/ (same schemas, "_triton" suffix).

Ops defined with ``torch.library.triton_op`` in the ``fastcascade`` namespace:

* ``route_threshold_triton(logits, logit_threshold) -> int32 (N,)``
* ``route_argmax_triton(logits) -> int32 (N,)``
* ``route_confident_triton(logits, temperature, max_sum) -> int32 (N,)``
* ``partition_triton(branch, num_branches) -> (order, counts, offsets)``
* ``gather_rows_triton(x, index)`` and ``scatter_rows_triton(src, index, num_rows)``
* ``vote_triton(member_logits, mode, need_probs) -> (labels, probs)``

Semantics: fastcascade.reference. Triton passes Python floats as fp32, so the float64 parameters
(the logit cut of fp64 logits, route_confident's temperature and 1 / tau) reach the kernels as
one-element device tensors. partition is the C++ algorithm in Triton's terms: per tile of rows a
one-hot (rows x bins) matrix whose column sums are the tile's counts and whose column cumsum gives
each row's rank within its bin (stable); torch's cumsum between the two launches scans the
(bin, tile) counts. gather and scatter are one row-copy kernel over rows viewed as the widest integer
type that divides them. No atomics anywhere: results are bitwise reproducible.

Fake kernels and autograd are registered elsewhere (fastcascade/_ops/routing.py).
"""

import math
import struct

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import FLOAT_DTYPES, launch, triton_op

__all__ = [
    "gather_rows_triton",
    "partition_triton",
    "route_argmax_triton",
    "route_confident_triton",
    "route_threshold_triton",
    "scatter_rows_triton",
    "vote_triton",
]

_INDEX_DTYPES = (torch.int32, torch.int64)
_BLOCK = 1024            # rows per program of route_threshold
_TILE_ELEMS = 4096       # elements of a (rows x classes) tile
_MAX_TILE_C = 4096       # route_argmax / route_confident loop over class chunks of at most this
_PARTITION_ELEMS = 8192  # elements of partition's (rows x bins) one-hot tile
_MAX_TILE_BINS = 64      # branches + 1 of the one-hot path; more use a stable device sort
_COPY_ELEMS = 4096       # elements of a row-copy tile


def _check_float(t: Tensor, op: str, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise RuntimeError(f"{op}: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")


def _check_2d(logits: Tensor, op: str) -> None:
    _check_float(logits, op, "logits")
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise RuntimeError(f"{op}: logits must be (N, C) with C >= 1, got shape {tuple(logits.shape)}")


def _round_down_to_f32(c: float) -> float:
    """The largest fp32 value <= c: for fp32 x, x > c exactly <=> x > this (see routing_math.h)."""
    fmax = float(np.finfo(np.float32).max)
    if c != c:
        return c
    if c > fmax:
        return c if c == float("inf") else fmax
    if c < -fmax:
        return float("-inf")
    f = struct.unpack("f", struct.pack("f", c))[0]
    return float(np.nextafter(np.float32(f), np.float32(-np.inf))) if f > c else f


def _scalar(v: float, dtype: torch.dtype, device) -> Tensor:
    return torch.full((1,), v, dtype=dtype, device=device)


# ----------------------------------------------------------------------------
# decisions
# ----------------------------------------------------------------------------


@triton.jit
def _route_threshold_kernel(x_ptr, c_ptr, out_ptr, N, CT: tl.constexpr, BF16_BITS: tl.constexpr,
                            BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    if BF16_BITS:  # bf16 widened by its bits: exact for subnormals too (the interpreter's cast flushes them)
        bits = tl.load(x_ptr + offs, mask=mask, other=0).to(tl.int32) & 0xFFFF
        x = (bits << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(x_ptr + offs, mask=mask, other=0).to(CT)
    c = tl.load(c_ptr)
    tl.store(out_ptr + offs, (x > c).to(tl.int32), mask=mask)


@triton.jit
def _first_max(x, valid, cols):
    """Per row of a tile: (max, first column holding it, first NaN column or 2**31 - 1), NaNs left out
    of the max."""
    is_nan = x != x
    xm = tl.where(valid & ~is_nan, x, float("-inf"))
    m = tl.max(xm, axis=1)
    hit = valid & ~is_nan & (xm == m[:, None])
    arg = tl.min(tl.where(hit, cols[None, :], 2147483647), axis=1)
    first_nan = tl.min(tl.where(valid & is_nan, cols[None, :], 2147483647), axis=1)
    return m, arg, first_nan


@triton.jit
def _route_argmax_kernel(x_ptr, out_ptr, N, C, CT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    best = tl.full([BLOCK_R], float("-inf"), CT)
    arg = tl.zeros([BLOCK_R], tl.int32)
    nan_at = tl.full([BLOCK_R], 2147483647, tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        valid = rmask[:, None] & (cols < C)[None, :]
        x = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=valid, other=0).to(CT)
        m, a, fn = _first_max(x, valid, cols)
        # strictly greater: an equal maximum in a later chunk keeps the earlier column; an all -inf
        # first chunk still names column 0 (torch.argmax)
        take = (m > best) | (c0 == 0)
        arg = tl.where(take, a, arg)
        best = tl.where(take, m, best)
        nan_at = tl.minimum(nan_at, fn)
    arg = tl.where(nan_at < 2147483647, nan_at, arg)
    tl.store(out_ptr + rows, arg, mask=rmask)


@triton.jit
def _route_confident_kernel(x_ptr, t_ptr, s_ptr, out_ptr, N, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    m = tl.full([BLOCK_R], float("-inf"), tl.float64)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        valid = rmask[:, None] & (cols < C)[None, :]
        x = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=valid, other=float("-inf")).to(tl.float64)
        cm = tl.max(x, axis=1)
        # NaN anywhere makes the row's max NaN (as the C++ fc_max chain and torch.amax do)
        has_nan = tl.max((valid & (x != x)).to(tl.int32), axis=1) > 0
        m = tl.where(has_nan | (m != m), float("nan"), tl.maximum(m, cm))
    temperature = tl.load(t_ptr)
    max_sum = tl.load(s_ptr)
    s = tl.zeros([BLOCK_R], tl.float64)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        valid = rmask[:, None] & (cols < C)[None, :]
        x = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=valid, other=0).to(tl.float64)
        e = tl.exp((x - m[:, None]) / temperature)
        s += tl.sum(tl.where(valid, e, 0.0), axis=1)
    tl.store(out_ptr + rows, (s <= max_sum).to(tl.int32), mask=rmask)


@triton_op("fastcascade::route_threshold_triton")
def route_threshold_triton(logits: Tensor, logit_threshold: float) -> Tensor:
    _check_float(logits, "route_threshold_triton", "logits")
    if not (logits.dim() == 1 or (logits.dim() == 2 and logits.shape[1] == 1)):
        raise RuntimeError(f"route_threshold_triton: logits must be (N,) or (N, 1), got shape {tuple(logits.shape)}")
    n = logits.shape[0]
    x = logits.reshape(n).contiguous()
    out = torch.empty(n, dtype=torch.int32, device=logits.device)
    fp64 = logits.dtype == torch.float64
    c = _scalar(logit_threshold if fp64 else _round_down_to_f32(logit_threshold),
                torch.float64 if fp64 else torch.float32, logits.device)
    if n > 0:
        bf16 = x.dtype == torch.bfloat16
        launch(_route_threshold_kernel, (triton.cdiv(n, _BLOCK),),
               x.view(torch.int16) if bf16 else x, c, out, n, CT=tl.float64 if fp64 else tl.float32, BF16_BITS=bf16,
               BLOCK=_BLOCK)
    return out


def _row_tile(C: int, elem_bits: int):
    """(BLOCK_R, BLOCK_C, num_warps) of the per-row decision kernels, for C classes computed in
    elem_bits-wide floats: a (rows x classes) tile of _TILE_ELEMS, 16 elements a thread (8 warps) in
    fp32, 8 in fp64 (16 warps); at 4 warps route_confident's fp64 tiles spill and route_argmax's fp32
    ones take 255 registers (ptxas -v, sm_90)."""
    block_c = min(triton.next_power_of_2(C), _MAX_TILE_C)
    return max(1, _TILE_ELEMS // block_c), block_c, 16 if elem_bits > 32 else 8


@triton_op("fastcascade::route_argmax_triton")
def route_argmax_triton(logits: Tensor) -> Tensor:
    _check_2d(logits, "route_argmax_triton")
    x = logits.contiguous()
    n, C = x.shape
    out = torch.empty(n, dtype=torch.int32, device=x.device)
    fp64 = x.dtype == torch.float64
    block_r, block_c, num_warps = _row_tile(C, 64 if fp64 else 32)
    if n > 0:
        # fp32 orders fp16/bf16/fp32 values exactly; fp64 keeps its own precision
        launch(_route_argmax_kernel, (triton.cdiv(n, block_r),),
               x, out, n, C, CT=tl.float64 if fp64 else tl.float32, BLOCK_R=block_r, BLOCK_C=block_c,
               num_warps=num_warps)
    return out


@triton_op("fastcascade::route_confident_triton")
def route_confident_triton(logits: Tensor, temperature: float, max_sum: float) -> Tensor:
    _check_2d(logits, "route_confident_triton")
    if not temperature > 0:
        raise RuntimeError(f"route_confident_triton: temperature must be > 0, got {temperature}")
    x = logits.contiguous()
    n, C = x.shape
    out = torch.empty(n, dtype=torch.int32, device=x.device)
    block_r, block_c, num_warps = _row_tile(C, 64)  # evaluated in fp64 whatever the logits' dtype
    if n > 0:
        t = _scalar(temperature, torch.float64, x.device)
        s = _scalar(max_sum, torch.float64, x.device)
        launch(_route_confident_kernel, (triton.cdiv(n, block_r),),
               x, t, s, out, n, C, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
    return out


# ----------------------------------------------------------------------------
# partition
# ----------------------------------------------------------------------------


@triton.jit
def _partition_onehot(branch_ptr, N, B, BLOCK: tl.constexpr, NB: tl.constexpr):
    """Rows of this program's tile, their validity, bin (B for ids outside [0, B)) and one-hot."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = rows < N
    b = tl.load(branch_ptr + rows, mask=valid, other=0).to(tl.int64)
    bins = tl.where((b >= 0) & (b < B), b, B)
    onehot = (valid[:, None] & (bins[:, None] == tl.arange(0, NB)[None, :])).to(tl.int32)
    return rows, valid, bins, onehot


@triton.jit
def _partition_count_kernel(branch_ptr, table_ptr, N, B, ntiles, BLOCK: tl.constexpr, NB: tl.constexpr):
    rows, valid, bins, onehot = _partition_onehot(branch_ptr, N, B, BLOCK, NB)
    j = tl.arange(0, NB)
    tl.store(table_ptr + j.to(tl.int64) * ntiles + tl.program_id(0), tl.sum(onehot, axis=0).to(tl.int64),
             mask=j <= B)


@triton.jit
def _partition_place_kernel(branch_ptr, table_ptr, order_ptr, N, B, ntiles, BLOCK: tl.constexpr, NB: tl.constexpr):
    rows, valid, bins, onehot = _partition_onehot(branch_ptr, N, B, BLOCK, NB)
    rank = tl.sum(tl.where(onehot > 0, tl.cumsum(onehot, axis=0), 0), axis=1) - 1  # rows of the bin before it
    first = tl.load(table_ptr + bins * ntiles + tl.program_id(0), mask=valid, other=0)
    tl.store(order_ptr + first + rank, rows, mask=valid)


def _partition_config(n: int, B: int):
    """(BLOCK rows per tile, NB one-hot bins, tiles) of the one-hot path for n rows into B branches."""
    nb = triton.next_power_of_2(B + 1)
    block = max(16, min(_PARTITION_ELEMS // nb, triton.next_power_of_2(n)))
    return block, nb, triton.cdiv(n, block)


@triton_op("fastcascade::partition_triton")
def partition_triton(branch: Tensor, num_branches: int) -> tuple[Tensor, Tensor, Tensor]:
    if branch.dtype not in _INDEX_DTYPES:
        raise RuntimeError(f"partition_triton: branch must be int32 or int64, got {branch.dtype}")
    if branch.dim() != 1:
        raise RuntimeError(f"partition_triton: branch must be (N,), got shape {tuple(branch.shape)}")
    if num_branches < 1:
        raise RuntimeError(f"partition_triton: num_branches must be >= 1, got {num_branches}")
    b = branch.contiguous()
    n, B, dev = b.shape[0], num_branches, b.device
    if n == 0:
        z = torch.zeros(B + 1, dtype=torch.int64, device=dev)
        return torch.empty(0, dtype=torch.int64, device=dev), z[:B].clone(), z
    if B + 1 > _MAX_TILE_BINS:
        # many branches: a stable device sort of the ids (out-of-range ones as B), bins by binary search
        key = torch.where((b >= 0) & (b < B), b.to(torch.int64), B)
        sorted_key, order = torch.sort(key, stable=True)
        offsets = torch.searchsorted(sorted_key, torch.arange(B + 1, device=dev))
        return order, offsets[1:] - offsets[:-1], offsets
    block, nb, ntiles = _partition_config(n, B)
    table = torch.empty((B + 1) * ntiles, dtype=torch.int64, device=dev)
    launch(_partition_count_kernel, (ntiles,), b, table, n, B, ntiles, BLOCK=block, NB=nb)
    first = torch.cumsum(table, 0) - table  # exclusive scan in (bin, tile) order
    order = torch.empty(n, dtype=torch.int64, device=dev)
    launch(_partition_place_kernel, (ntiles,), b, first, order, n, B, ntiles, BLOCK=block, NB=nb)
    offsets = first.view(B + 1, ntiles)[:, 0].contiguous()
    return order, offsets[1:] - offsets[:-1], offsets


# ----------------------------------------------------------------------------
# gather_rows / scatter_rows: one row copy, dst[dst_idx[i] or i] = src[src_idx[i] or i]
# ----------------------------------------------------------------------------


@triton.jit
def _copy_rows_kernel(src_ptr, dst_ptr, idx_ptr, M, D, src_rows, dst_rows, n_dblk, GATHER: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # one grid axis (up to 2^31 - 1 programs; the others stop at 65535), n_dblk column tiles per row tile
    pid = tl.program_id(0).to(tl.int64)
    rt = pid // n_dblk
    i = rt * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid - rt * n_dblk) * BLOCK_D + tl.arange(0, BLOCK_D)
    imask = i < M
    idx = tl.load(idx_ptr + i, mask=imask, other=0).to(tl.int64)
    if GATHER:  # an out-of-range source row reads as zeros
        s, d, ok_s, ok_d = idx, i, (idx >= 0) & (idx < src_rows), imask
    else:  # an out-of-range destination row is skipped
        s, d, ok_s, ok_d = i, idx, imask, (idx >= 0) & (idx < dst_rows)
    cmask = (cols < D)[None, :]
    v = tl.load(src_ptr + s[:, None] * D + cols[None, :], mask=(imask & ok_s)[:, None] & cmask, other=0)
    tl.store(dst_ptr + d[:, None] * D + cols[None, :], v, mask=(imask & ok_d)[:, None] & cmask)


_WORDS = ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2), (torch.uint8, 1))


def _copy_rows(src: Tensor, dst: Tensor, index: Tensor, gather: bool) -> None:
    """Rows of contiguous src and dst copied as (rows, D) words of the widest integer type that
    divides a row and src's byte offset: whole words move whatever the dtype (bool, complex, ...)."""
    M, src_rows, dst_rows = index.shape[0], src.shape[0], dst.shape[0]
    row_bytes = math.prod(src.shape[1:]) * src.element_size()
    if M == 0 or row_bytes == 0 or dst_rows == 0:
        return
    if src_rows == 0:  # gather from no rows: every index is out of range and reads as zeros
        dst.zero_()
        return
    offset = src.storage_offset() * src.element_size()
    word = next(w for w, size in _WORDS if row_bytes % size == 0 and offset % size == 0)
    s = src.reshape(src_rows, -1).view(torch.uint8).view(word)
    d = dst.reshape(dst_rows, -1).view(torch.uint8).view(word)
    D = d.shape[1]
    block_r, block_d, n_dblk = _copy_config(M, D)
    launch(_copy_rows_kernel, (triton.cdiv(M, block_r) * n_dblk,),
           s, d, index, M, D, src_rows, dst_rows, n_dblk, GATHER=gather, BLOCK_R=block_r, BLOCK_D=block_d)


def _copy_config(M: int, D: int):
    """(BLOCK_R, BLOCK_D, column tiles per row tile) of the row copy of M rows of D words."""
    block_d = min(triton.next_power_of_2(D), 1024)
    return max(1, _COPY_ELEMS // block_d), block_d, triton.cdiv(D, block_d)


def _check_rows(x: Tensor, name: str, index: Tensor, op: str) -> None:
    if x.dim() < 1:
        raise RuntimeError(f"{op}: {name} must have at least one dimension (rows), got a 0-dim tensor")
    if index.dtype not in _INDEX_DTYPES or index.dim() != 1:
        raise RuntimeError(f"{op}: index must be a 1-D int32 or int64 tensor, got {index.dtype} {tuple(index.shape)}")
    if index.device != x.device:
        raise RuntimeError(f"{op}: {name} and index must be on the same device, got {x.device} and {index.device}")


@triton_op("fastcascade::gather_rows_triton")
def gather_rows_triton(x: Tensor, index: Tensor) -> Tensor:
    _check_rows(x, "x", index, "gather_rows_triton")
    src, idx = x.contiguous(), index.contiguous()
    out = torch.empty((idx.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _copy_rows(src, out, idx, gather=True)
    return out


@triton_op("fastcascade::scatter_rows_triton")
def scatter_rows_triton(src: Tensor, index: Tensor, num_rows: int) -> Tensor:
    _check_rows(src, "src", index, "scatter_rows_triton")
    if num_rows < 0:
        raise RuntimeError(f"scatter_rows_triton: num_rows must be >= 0, got {num_rows}")
    if index.shape[0] != src.shape[0]:
        raise RuntimeError(f"scatter_rows_triton: index must have one entry per row of src ({src.shape[0]}), "
                           f"got {index.shape[0]}")
    s, idx = src.contiguous(), index.contiguous()
    out = torch.zeros((num_rows,) + tuple(src.shape[1:]), dtype=src.dtype, device=src.device)
    _copy_rows(s, out, idx, gather=False)
    return out


# ----------------------------------------------------------------------------
# vote
# ----------------------------------------------------------------------------


@triton.jit
def _member_offsets(k, N, rows, C, cols):
    """Offsets of member k's rows in (K, N, C) logits: int64 before k * N, which passes 2^31 once
    K N does (k is an int32 loop counter, N an int32 argument below 2^31)."""
    return (tl.cast(k, tl.int64) * N + rows)[:, None] * C + cols[None, :]


@triton.jit
def _vote_kernel(x_ptr, labels_ptr, probs_ptr, K, N, C, HARD: tl.constexpr, NEED_PROBS: tl.constexpr,
                 CT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < N
    valid = rmask[:, None] & (cols < C)[None, :]
    p = tl.zeros([BLOCK_R, BLOCK_C], CT)
    votes = tl.zeros([BLOCK_R, BLOCK_C], tl.int32)
    for k in range(K):
        x = tl.load(x_ptr + _member_offsets(k, N, rows, C, cols), mask=valid, other=0).to(CT)
        m = tl.max(tl.where(valid, x, float("-inf")), axis=1)
        e = tl.where(valid, tl.exp(x - m[:, None]), 0.0)
        s = tl.where(rmask, tl.sum(e, axis=1), 1.0)  # >= 1 on real rows; padding rows divide 0 by 1
        p += e / s[:, None]
        if HARD:
            mx, a, fn = _first_max(x, valid, cols)
            a = tl.where(fn < 2147483647, fn, a)
            votes += (cols[None, :] == a[:, None]).to(tl.int32)
    if HARD:
        most = tl.max(votes, axis=1)
        cand = valid & (votes == most[:, None])
    else:
        cand = valid
    score = tl.where(cand, p, -1.0)
    best = tl.max(score, axis=1)
    label = tl.min(tl.where(cand & (score == best[:, None]), cols[None, :], 2147483647), axis=1)
    tl.store(labels_ptr + rows, label.to(tl.int64), mask=rmask)
    if NEED_PROBS:
        tl.store(probs_ptr + rows[:, None] * C + cols[None, :], p / K, mask=valid)


def _vote_config(n: int, C: int, fp64: bool):
    """(BLOCK_R, BLOCK_C, num_warps) of the vote kernel: whole rows of C classes, a tile of up to
    _TILE_ELEMS at 16 warps, so that the tile's logits, probability sums and vote counts stay in
    registers (fp32 soft votes spill at 4 and at 8 warps; ptxas -v, sm_90)."""
    block_c = triton.next_power_of_2(C)
    block_r = max(1, min(_TILE_ELEMS // block_c, triton.next_power_of_2(max(n, 1))))
    return block_r, block_c, 16


@triton_op("fastcascade::vote_triton")
def vote_triton(member_logits: Tensor, mode: int, need_probs: bool) -> tuple[Tensor, Tensor]:
    _check_float(member_logits, "vote_triton", "member_logits")
    if member_logits.dim() != 3 or member_logits.shape[0] < 1 or member_logits.shape[2] < 1:
        raise RuntimeError(f"vote_triton: member_logits must be (K, N, C) with K, C >= 1, got shape "
                           f"{tuple(member_logits.shape)}")
    if mode not in (0, 1):
        raise RuntimeError(f"vote_triton: mode must be 0 (hard) or 1 (soft), got {mode}")
    x = member_logits.contiguous()
    K, n, C = x.shape
    if C > _MAX_TILE_C:
        raise RuntimeError(f"vote_triton: at most {_MAX_TILE_C} classes, got {C}; use backend='cuda'")
    fp64 = x.dtype == torch.float64
    acc = torch.float64 if fp64 else torch.float32
    labels = torch.empty(n, dtype=torch.int64, device=x.device)
    probs = torch.empty((n if need_probs else 0, C), dtype=acc, device=x.device)
    block_r, block_c, num_warps = _vote_config(n, C, fp64)
    if n > 0:
        launch(_vote_kernel, (triton.cdiv(n, block_r),),
               x, labels, probs, K, n, C, HARD=mode == 0, NEED_PROBS=bool(need_probs),
               CT=tl.float64 if fp64 else tl.float32, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
    return labels, probs
