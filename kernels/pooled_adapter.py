"""Triton kernels for the pooled residual adapter (forward + fused backward).

Two custom ops are defined with ``torch.library.triton_op`` in the
``fastcascade`` namespace:

* ``fastcascade::pooled_adapter_triton``
    (x, down_w, down_b, up_w, up_b, scale, activation, dropout, seed) -> (y, pooled, hidden)
* ``fastcascade::_pooled_adapter_backward_triton``
    (grad_y, pooled, hidden, down_w, up_w, up_b, scale, activation, dropout, seed)
    -> (grad_x, grad_down_w, grad_down_b, grad_up_w, grad_up_b, grad_scale)

Dropout (p = dropout) acts on act(h), its mask hashed from (seed, b * r + j) by _dropout_keep, the
same function as the C++ kernels' adapter_dropout_keep (and reference.adapter_dropout_keep).

Semantics (fastcascade.reference.pooled_adapter)::

    m = mean_hw(x)                       (B, C)   "pooled"
    h = m down_w^T + down_b              (B, r)   "hidden" (pre-activation)
    u = act(h) up_w^T + up_b             (B, C)
    y = x + s u[:, :, None, None]        s = scale, or 1 when scale is None

activation: 0 relu, 1 gelu (erf form), 2 silu. x is (B, C, H, W), contiguous (NCHW) or
channels_last (NHWC); everything is computed in fp32 (fp64 for fp64 x), weights are read
converted to that dtype.

Each op is one kernel launch whose programs own BLOCK_B whole samples: the pooled sum
(or the spatial gradient sum) is a fixed-order loop over the sample's channels and
positions, the bottleneck matmuls are loops over channel chunks, and x (grad_y) is read
a second time (mostly from cache) to write y (grad_x). No atomics; the block sizes
depend only on the shapes and dtypes, so results are bitwise reproducible. The weight
gradients of the backward are torch.mm / torch.sum over small (B, C) and (B, r) scratch
matrices written by the kernel.

Fake kernels and autograd are registered elsewhere (fastcascade/_ops/pooled_adapter.py).
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    FLOAT_DTYPES,
    act_fwd_bwd,
    check_activation,
    check_adapter_params,
    check_param,
    check_scale,
    dropout_args,
    dropped,
    launch,
    triton_op,
)

__all__ = ["pooled_adapter_backward_triton", "pooled_adapter_triton"]

# elements of the (BLOCK_B x BLOCK_C x BLOCK_HW) tile of x loaded per loop step
_TILE_ELEMS = 4096
# elements of the (BLOCK_B x BLOCK_R x BLOCK_C) broadcast-multiply-sum matmul tile
_MM_ELEMS = 8192
# samples per program at most; BLOCK_B >= 16 (fp32/half x) switches the matmuls to tl.dot
_MAX_BLOCK_B = 16
# keep at least this many programs when choosing BLOCK_B > 1
_MIN_PROGRAMS = 256
# tests may force BLOCK_B (a power of two); None: heuristic
_FORCE_BLOCK_B: int | None = None

_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------


@triton.jit
def _act_fwd(h, ACT: tl.constexpr):
    """act(h): 0 relu, 1 gelu (erf), 2 silu; evaluated in fp64 (only (B, r) values), so gelu's
    1 + erf(h / sqrt 2) keeps its relative precision for negative h in fp32 mode."""
    hd = h.to(tl.float64)
    if ACT == 0:
        a = tl.where(hd <= 0.0, 0.0, hd)  # relu as torch.relu: NaN stays NaN
    elif ACT == 1:
        a = 0.5 * hd * (1.0 + tl.math.erf(hd * 0.7071067811865476))
    else:
        a = hd / (1.0 + tl.exp(-hd))
    return a.to(h.dtype)


@triton.jit
def _sample_rows(pid, B, BLOCK_B: tl.constexpr):
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    return rows, rows < B


@triton.jit
def _chunk_offsets(base3, bmask3, cc, cmask, stride_c, BIG_INDEX: tl.constexpr):
    """Offsets and mask of channels cc of the program's samples: (BLOCK_B, BLOCK_C, 1)."""
    if BIG_INDEX:
        coff = cc.to(tl.int64) * stride_c
    else:
        coff = cc * stride_c
    return base3 + coff[None, :, None], bmask3 & cmask[None, :, None]


@triton.jit
def _hw_offsets(off3, m3, s0, HW, stride_s, BIG_INDEX: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Offsets and mask of positions [s0, s0 + BLOCK_HW) within the chunk: (BLOCK_B, BLOCK_C, BLOCK_HW)."""
    ss = s0 + tl.arange(0, BLOCK_HW)
    if BIG_INDEX:
        soff = ss.to(tl.int64) * stride_s
    else:
        soff = ss * stride_s
    return off3 + soff[None, None, :], m3 & (ss < HW)[None, None, :]


@triton.jit
def _chunk_sums(ptr, base3, bmask3, cc, cmask, stride_c, stride_s, HW, CT: tl.constexpr,
                BIG_INDEX: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Sum over H, W of channels cc of the program's samples, in a fixed order: (BLOCK_B, BLOCK_C)."""
    off3, m3 = _chunk_offsets(base3, bmask3, cc, cmask, stride_c, BIG_INDEX)
    acc = tl.zeros([BLOCK_B, BLOCK_C, BLOCK_HW], CT)
    for s0 in range(0, HW, BLOCK_HW):
        off, msk = _hw_offsets(off3, m3, s0, HW, stride_s, BIG_INDEX, BLOCK_HW)
        acc += tl.load(ptr + off, mask=msk, other=0).to(CT)
    return tl.sum(acc, axis=2)


@triton.jit
def _chunk_add(in_ptr, out_ptr, v, base3, bmask3, cc, cmask, stride_c, stride_s, HW, CT: tl.constexpr,
               BIG_INDEX: tl.constexpr, BLOCK_HW: tl.constexpr):
    """out = in + v broadcast over H, W, for channels cc of the program's samples; v: (BLOCK_B, BLOCK_C)."""
    off3, m3 = _chunk_offsets(base3, bmask3, cc, cmask, stride_c, BIG_INDEX)
    v3 = v[:, :, None]
    for s0 in range(0, HW, BLOCK_HW):
        off, msk = _hw_offsets(off3, m3, s0, HW, stride_s, BIG_INDEX, BLOCK_HW)
        xv = tl.load(in_ptr + off, mask=msk, other=0).to(CT)
        tl.store(out_ptr + off, (xv + v3).to(out_ptr.dtype.element_ty), mask=msk)


# ----------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------


@triton.jit
def _pooled_adapter_fwd_kernel(
    x_ptr, y_ptr, dw_ptr, db_ptr, uw_ptr, ub_ptr, s_ptr, pooled_ptr, hidden_ptr,
    B, C, R, HW, stride_b, stride_c, stride_s, seed_lo, seed_hi, threshold, keep_scale,
    ACT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_FP64: tl.constexpr,
    USE_DOT: tl.constexpr, BIG_INDEX: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    CT: tl.constexpr = tl.float64 if USE_FP64 else tl.float32
    pid = tl.program_id(0)
    rows, bmask = _sample_rows(pid, B, BLOCK_B)
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < R
    base3 = (rows.to(tl.int64) * stride_b)[:, None, None]
    bmask3 = bmask[:, None, None]

    # ---- pass 1: pooled mean per channel chunk, h += m_chunk down_w[:, chunk]^T ----
    h = tl.zeros([BLOCK_B, BLOCK_R], CT)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cmask = cc < C
        m = _chunk_sums(x_ptr, base3, bmask3, cc, cmask, stride_c, stride_s, HW, CT, BIG_INDEX,
                        BLOCK_B, BLOCK_C, BLOCK_HW) / HW  # (BLOCK_B, BLOCK_C); 0 in masked slots
        tl.store(pooled_ptr + rows[:, None].to(tl.int64) * C + cc[None, :], m,
                 mask=bmask[:, None] & cmask[None, :])
        if USE_DOT:
            # down_w[:, chunk]^T as (BLOCK_C, BLOCK_R)
            wt = tl.load(dw_ptr + rr[None, :].to(tl.int64) * C + cc[:, None],
                         mask=cmask[:, None] & rmask[None, :], other=0)
            h = tl.dot(m, wt, h, input_precision="ieee")
        else:
            # down_w[:, chunk] as (BLOCK_R, BLOCK_C)
            w = tl.load(dw_ptr + rr[:, None].to(tl.int64) * C + cc[None, :],
                        mask=rmask[:, None] & cmask[None, :], other=0)
            h += tl.sum(m[:, None, :] * w[None, :, :], axis=2)

    h += tl.load(db_ptr + rr, mask=rmask, other=0)[None, :]
    tl.store(hidden_ptr + rows[:, None].to(tl.int64) * R + rr[None, :], h,
             mask=bmask[:, None] & rmask[None, :])
    a = _act_fwd(h, ACT)  # act(0) = 0 in the padded slots
    a = dropped(a, rows[:, None].to(tl.int64) * R + rr[None, :], seed_lo, seed_hi, threshold, keep_scale,
                 HAS_DROPOUT)
    if HAS_SCALE:
        s = tl.load(s_ptr)

    # ---- pass 2: u_chunk = a up_w[chunk]^T + up_b[chunk]; y = x + s u ----
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cmask = cc < C
        if USE_DOT:
            # up_w[chunk]^T as (BLOCK_R, BLOCK_C)
            uwt = tl.load(uw_ptr + cc[None, :].to(tl.int64) * R + rr[:, None],
                          mask=rmask[:, None] & cmask[None, :], other=0)
            u = tl.dot(a, uwt, input_precision="ieee")
        else:
            # up_w[chunk] as (BLOCK_C, BLOCK_R)
            uw = tl.load(uw_ptr + cc[:, None].to(tl.int64) * R + rr[None, :],
                         mask=cmask[:, None] & rmask[None, :], other=0)
            u = tl.sum(a[:, None, :] * uw[None, :, :], axis=2)
        u += tl.load(ub_ptr + cc, mask=cmask, other=0)[None, :]
        if HAS_SCALE:
            u = s * u
        _chunk_add(x_ptr, y_ptr, u, base3, bmask3, cc, cmask, stride_c, stride_s, HW, CT, BIG_INDEX, BLOCK_HW)


# ----------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------


@triton.jit
def _pooled_adapter_bwd_kernel(
    gy_ptr, gx_ptr, hid_ptr, dw_ptr, uw_ptr, ub_ptr, s_ptr,
    gu_ptr, gh_ptr, a_ptr, gsp_ptr,
    B, C, R, HW, stride_b, stride_c, stride_s, seed_lo, seed_hi, threshold, keep_scale,
    ACT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_FP64: tl.constexpr,
    USE_DOT: tl.constexpr, BIG_INDEX: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    CT: tl.constexpr = tl.float64 if USE_FP64 else tl.float32
    pid = tl.program_id(0)
    rows, bmask = _sample_rows(pid, B, BLOCK_B)
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < R
    base3 = (rows.to(tl.int64) * stride_b)[:, None, None]
    bmask3 = bmask[:, None, None]
    br_off = rows[:, None].to(tl.int64) * R + rr[None, :]
    br_mask = bmask[:, None] & rmask[None, :]

    hid = tl.load(hid_ptr + br_off, mask=br_mask, other=0)
    a, da = act_fwd_bwd(hid, ACT, True)
    a = dropped(a, br_off, seed_lo, seed_hi, threshold, keep_scale, HAS_DROPOUT)  # index b * r + j
    da = dropped(da, br_off, seed_lo, seed_hi, threshold, keep_scale, HAS_DROPOUT)
    tl.store(a_ptr + br_off, a, mask=br_mask)
    if HAS_SCALE:
        s = tl.load(s_ptr)
        gsc = tl.zeros([BLOCK_B], CT)

    # ---- pass 1: g_sum per channel chunk; g_u = s g_sum; g_a += g_u up_w[chunk] ----
    ga = tl.zeros([BLOCK_B, BLOCK_R], CT)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cmask = cc < C
        gsum = _chunk_sums(gy_ptr, base3, bmask3, cc, cmask, stride_c, stride_s, HW, CT, BIG_INDEX,
                           BLOCK_B, BLOCK_C, BLOCK_HW)  # (BLOCK_B, BLOCK_C)
        if HAS_SCALE:
            gu = s * gsum
        else:
            gu = gsum
        tl.store(gu_ptr + rows[:, None].to(tl.int64) * C + cc[None, :], gu,
                 mask=bmask[:, None] & cmask[None, :])
        # up_w[chunk] as (BLOCK_C, BLOCK_R)
        uw = tl.load(uw_ptr + cc[:, None].to(tl.int64) * R + rr[None, :],
                     mask=cmask[:, None] & rmask[None, :], other=0)
        if USE_DOT:
            ga = tl.dot(gu, uw, ga, input_precision="ieee")
        else:
            ga += tl.sum(gu[:, :, None] * uw[None, :, :], axis=1)
        if HAS_SCALE:
            # u_chunk = a up_w[chunk]^T + up_b[chunk], for grad_scale = sum(u g_sum)
            if USE_DOT:
                u = tl.dot(a, tl.trans(uw), input_precision="ieee")
            else:
                u = tl.sum(a[:, None, :] * uw[None, :, :], axis=2)
            u += tl.load(ub_ptr + cc, mask=cmask, other=0)[None, :]
            gsc += tl.sum(tl.where(cmask[None, :], u * gsum, 0.0), axis=1)

    gh = ga * da
    tl.store(gh_ptr + br_off, gh, mask=br_mask)
    if HAS_SCALE:
        tl.store(gsp_ptr + rows, gsc, mask=bmask)

    # ---- pass 2: g_m = g_h down_w[:, chunk]; grad_x = gy + g_m / HW ----
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cmask = cc < C
        # down_w[:, chunk] as (BLOCK_R, BLOCK_C)
        w = tl.load(dw_ptr + rr[:, None].to(tl.int64) * C + cc[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0)
        if USE_DOT:
            gm = tl.dot(gh, w, input_precision="ieee")
        else:
            gm = tl.sum(gh[:, :, None] * w[None, :, :], axis=1)
        _chunk_add(gy_ptr, gx_ptr, gm / HW, base3, bmask3, cc, cmask, stride_c, stride_s, HW, CT, BIG_INDEX,
                   BLOCK_HW)


# ----------------------------------------------------------------------------
# host helpers
# ----------------------------------------------------------------------------


def _nchw_strides(name: str, what: str, t: Tensor):
    """(stride_b, stride_c, stride_hw) of a 4-D tensor that is contiguous (NCHW) or channels_last
    (NHWC), flattening H and W into one index; anything else is refused."""
    if t.dim() != 4:
        raise RuntimeError(f"{name}: {what} must be 4-D (B, C, H, W), got shape {tuple(t.shape)}")
    _, C, H, W = t.shape
    if t.is_contiguous():
        return C * H * W, H * W, 1
    if t.is_contiguous(memory_format=torch.channels_last):
        return H * W * C, 1, C
    raise RuntimeError(
        f"{name}: {what} must be contiguous (NCHW) or channels_last (NHWC), got strides {tuple(t.stride())} "
        f"for shape {tuple(t.shape)}; make it contiguous first")


def _config(B: int, C: int, R: int, HW: int, elem_size: int, use_fp64: bool, channels_last: bool):
    """Block sizes; they depend only on the shapes, the dtype and the layout (so results are
    reproducible for given inputs).

    Returns (BLOCK_B, BLOCK_C, BLOCK_R, BLOCK_HW, USE_DOT, num_warps)."""
    # samples per program: enough that re-reading the weights (2 r C fp32 per program) stays
    # small next to the two passes over x (2 C HW elem_size per sample), but keep >= _MIN_PROGRAMS
    # programs (each program walks whole samples, so small batches get few programs).
    if _FORCE_BLOCK_B is not None:
        bb = int(_FORCE_BLOCK_B)
    else:
        want = triton.next_power_of_2(max(1, -(-16 * R // max(1, HW * elem_size))))
        cap = 1
        while cap * 2 <= _MAX_BLOCK_B and B // (cap * 2) >= _MIN_PROGRAMS:
            cap *= 2
        bb = max(1, min(want, cap, _MAX_BLOCK_B))
    use_dot = bb >= 16 and not use_fp64
    br = triton.next_power_of_2(max(R, 1))
    cp = triton.next_power_of_2(max(C, 1))
    hwp = triton.next_power_of_2(max(HW, 1))
    if use_dot:
        br = max(br, 16)
        # the contiguous dim of the x tile gets the longer side (tl.dot needs BLOCK_C >= 16)
        bc = max(16, min(cp, 64)) if channels_last else 16
    else:
        bc = min(cp, max(16, _MM_ELEMS // (bb * br)))
    bhw = min(hwp, max(1, _TILE_ELEMS // (bb * bc)))
    tile = max(bb * bc * bhw, bb * br * (1 if use_dot else bc), bc * br)
    num_warps = 8 if tile >= 4096 else 4
    return bb, bc, br, bhw, use_dot, num_warps


def _acc_copy(t: Tensor, acc_dtype: torch.dtype) -> Tensor:
    return t.to(dtype=acc_dtype).contiguous()


# ----------------------------------------------------------------------------
# ops
# ----------------------------------------------------------------------------


@triton_op("fastcascade::pooled_adapter_triton")
def pooled_adapter_triton(
    x: Tensor,
    down_w: Tensor,
    down_b: Tensor,
    up_w: Tensor,
    up_b: Tensor,
    scale: Optional[Tensor],
    activation: int,
    dropout: float,
    seed: int,
) -> tuple[Tensor, Tensor, Tensor]:
    name = "pooled_adapter_triton"
    check_activation(name, activation)
    drop = dropout_args(dropout, seed)
    if x.dtype not in FLOAT_DTYPES:
        raise RuntimeError(f"{name}: x must be float16/bfloat16/float32/float64, got {x.dtype}")
    sb, sc, ss = _nchw_strides(name, "x", x)
    B, C, H, W = x.shape
    HW = H * W
    if down_w.dim() != 2:
        raise RuntimeError(f"{name}: down_w must be 2-D (r, C), got shape {tuple(down_w.shape)}")
    R = down_w.shape[0]
    dev = x.device
    check_adapter_params(name, down_w, down_b, up_w, up_b, scale, C, R, dev)

    use_fp64 = x.dtype == torch.float64
    acc_dtype = torch.float64 if use_fp64 else torch.float32
    dw = _acc_copy(down_w, acc_dtype)
    db = _acc_copy(down_b, acc_dtype)
    uw = _acc_copy(up_w, acc_dtype)
    ub = _acc_copy(up_b, acc_dtype)
    s = _acc_copy(scale.reshape(1), acc_dtype) if scale is not None else db  # db: unused

    y = torch.empty_like(x)
    pooled = torch.empty((B, C), dtype=acc_dtype, device=dev)
    hidden = torch.empty((B, R), dtype=acc_dtype, device=dev)
    if B == 0:
        return y, pooled, hidden

    channels_last = sc == 1 and ss != 1
    bb, bc, br, bhw, use_dot, num_warps = _config(B, C, R, HW, x.element_size(), use_fp64, channels_last)
    grid = (triton.cdiv(B, bb),)
    launch(_pooled_adapter_fwd_kernel, grid,
           x, y, dw, db, uw, ub, s, pooled, hidden,
           B, C, R, HW, sb, sc, ss, *drop,
           ACT=int(activation), HAS_SCALE=scale is not None, HAS_DROPOUT=dropout > 0, USE_FP64=use_fp64,
           USE_DOT=use_dot, BIG_INDEX=C * HW > _INT32_MAX,
           BLOCK_B=bb, BLOCK_C=bc, BLOCK_R=br, BLOCK_HW=bhw, num_warps=num_warps)
    return y, pooled, hidden


@triton_op("fastcascade::_pooled_adapter_backward_triton")
def pooled_adapter_backward_triton(
    grad_y: Tensor,
    pooled: Tensor,
    hidden: Tensor,
    down_w: Tensor,
    up_w: Tensor,
    up_b: Tensor,
    scale: Optional[Tensor],
    activation: int,
    dropout: float,
    seed: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    name = "_pooled_adapter_backward_triton"
    check_activation(name, activation)
    drop = dropout_args(dropout, seed)
    if grad_y.dtype not in FLOAT_DTYPES:
        raise RuntimeError(f"{name}: grad_y must be float16/bfloat16/float32/float64, got {grad_y.dtype}")
    sb, sc, ss = _nchw_strides(name, "grad_y", grad_y)
    B, C, H, W = grad_y.shape
    HW = H * W
    if hidden.dim() != 2 or hidden.shape[0] != B:
        raise RuntimeError(f"{name}: hidden must be ({B}, r), got shape {tuple(hidden.shape)}")
    R = hidden.shape[1]
    dev = grad_y.device
    check_param(name, "pooled", pooled, (B, C), dev)
    check_param(name, "hidden", hidden, (B, R), dev)
    check_param(name, "down_w", down_w, (R, C), dev)
    check_param(name, "up_w", up_w, (C, R), dev)
    check_param(name, "up_b", up_b, (C,), dev)
    check_scale(name, scale, dev)

    use_fp64 = grad_y.dtype == torch.float64
    acc_dtype = torch.float64 if use_fp64 else torch.float32
    hid = _acc_copy(hidden, acc_dtype)
    dw = _acc_copy(down_w, acc_dtype)
    uw = _acc_copy(up_w, acc_dtype)
    ub = _acc_copy(up_b, acc_dtype)
    s = _acc_copy(scale.reshape(1), acc_dtype) if scale is not None else ub  # ub: unused

    grad_x = torch.empty_like(grad_y)
    g_u = torch.empty((B, C), dtype=acc_dtype, device=dev)   # s * sum_hw grad_y
    g_h = torch.empty((B, R), dtype=acc_dtype, device=dev)   # grad wrt hidden
    act = torch.empty((B, R), dtype=acc_dtype, device=dev)   # act(hidden)
    gs_part = torch.empty((B if scale is not None else 0,), dtype=acc_dtype, device=dev)

    if B > 0:
        channels_last = sc == 1 and ss != 1
        bb, bc, br, bhw, use_dot, num_warps = _config(B, C, R, HW, grad_y.element_size(), use_fp64,
                                                      channels_last)
        grid = (triton.cdiv(B, bb),)
        launch(_pooled_adapter_bwd_kernel, grid,
               grad_y, grad_x, hid, dw, uw, ub, s,
               g_u, g_h, act, gs_part if scale is not None else g_u,
               B, C, R, HW, sb, sc, ss, *drop,
               ACT=int(activation), HAS_SCALE=scale is not None, HAS_DROPOUT=dropout > 0, USE_FP64=use_fp64,
               USE_DOT=use_dot, BIG_INDEX=C * HW > _INT32_MAX,
               BLOCK_B=bb, BLOCK_C=bc, BLOCK_R=br, BLOCK_HW=bhw, num_warps=num_warps)

    pooled_acc = pooled.to(acc_dtype)
    grad_up_w = torch.mm(g_u.t(), act).to(up_w.dtype)          # (C, r)
    grad_up_b = torch.sum(g_u, dim=0).to(up_b.dtype)           # (C,)
    grad_down_w = torch.mm(g_h.t(), pooled_acc).to(down_w.dtype)  # (r, C)
    grad_down_b = torch.sum(g_h, dim=0).to(down_w.dtype)       # (r,)
    if scale is not None:
        grad_scale = torch.sum(gs_part).to(scale.dtype).reshape(scale.shape)
    else:
        grad_scale = torch.empty(0, dtype=acc_dtype, device=dev)
    return grad_x, grad_down_w, grad_down_b, grad_up_w, grad_up_b, grad_scale
