"""Triton kernels for the pixel (token) residual adapter (fastcascade.reference.pixel_adapter).

Two custom ops, defined with ``torch.library.triton_op`` (fake kernels and autograd are registered
in fastcascade/_ops/pixel_adapter.py, shared with the C++ twins):

* ``fastcascade::pixel_adapter_triton``
    (x, down_w, down_b, up_w, up_b, scale, activation, dropout, seed) -> y
* ``fastcascade::_pixel_adapter_backward_triton``
    (grad_y, x, down_w, down_b, up_w, up_b, scale, activation, dropout, seed)
    -> (grad_x, grad_down_w, grad_down_b, grad_up_w, grad_up_b, grad_scale)

x is (B, C, H, W), contiguous or channels_last, or tokens (T, C). A program owns BLOCK_T positions:
the hidden layer h = x W_d^T + b_d is accumulated over channel chunks with tl.dot and, for
r <= _MAX_BLOCK_R (fp32, fp64; _MAX_BLOCK_R_HALF for fp16, bf16), stays in registers; activation and dropout (the mask hashed from (seed,
position * r + j), identical to the C++ kernels') follow, in the accumulator's precision, then a
second loop over channel chunks writes y = x + s (a W_u^T + b_u), re-reading x from cache. Wider r
is formed that many columns at a time (each re-reading the tile of x) into a (positions, r)
scratch that the up-projection reads back, so any r fits in registers and shared memory.
Half-precision x runs the products in x's dtype with fp32 accumulation (the weights rounded to it,
as nn.Linear under autocast; fp32 products under TRITON_INTERPRET=1, whose bf16 arithmetic does not
round as a GPU does); fp32 and fp64 x in full precision. Channel offsets are int64 once C times the
channel stride passes 2^31 (one NCHW sample of 2^31 elements).

Backward recomputes h from x, writes grad_x = grad_y + g_h W_d and the (positions, r) matrices
g_h and a; the weight gradients are then products of those with grad_y and x (torch.mm, over all
positions), and d/ds sums per-program partials in program order. Wide r again goes by column
chunks, grad_x reading g_h back. No atomics: reproducible bitwise.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    INTERPRETED,
    act_fwd_bwd,
    check_activation,
    check_adapter_params,
    dropout_args,
    dropped,
    launch,
    triton_op,
)

__all__ = ["pixel_adapter_backward_triton", "pixel_adapter_triton"]

@triton.jit
def _tile(pid, T, HW, stride_b, stride_c, stride_p, BLOCK_T: tl.constexpr):
    """Positions of the program's tile, their mask and their base offsets into x."""
    t = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    base = (t // HW) * stride_b + (t % HW) * stride_p
    return t, tmask, base


@triton.jit
def _cols(c0, C, BIG_INDEX: tl.constexpr, BLOCK_C: tl.constexpr):
    """Channels [c0, c0 + BLOCK_C) and their mask; int64 when channel offsets (c * stride_c into x,
    c * r into the weights) can pass 2^31."""
    cc = c0 + tl.arange(0, BLOCK_C)
    if BIG_INDEX:
        cc = cc.to(tl.int64)
    return cc, cc < C


@triton.jit
def _hidden(x_ptr, wdT_ptr, bd_ptr, base, tmask, C, R, j0, stride_c, DOT: tl.constexpr,
            PREC: tl.constexpr, BIG_INDEX: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
            BLOCK_R: tl.constexpr, ACC: tl.constexpr):
    """Columns [j0, j0 + BLOCK_R) of h = x W_d^T + b_d for the tile: (BLOCK_T, BLOCK_R), zero in the
    padded columns."""
    rr = j0 + tl.arange(0, BLOCK_R)
    rmask = rr < R
    h = tl.zeros((BLOCK_T, BLOCK_R), dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        cc, cmask = _cols(c0, C, BIG_INDEX, BLOCK_C)
        xt = tl.load(x_ptr + base[:, None] + cc[None, :] * stride_c, mask=tmask[:, None] & cmask[None, :], other=0.0)
        wd = tl.load(wdT_ptr + cc[:, None] * R + rr[None, :], mask=cmask[:, None] & rmask[None, :], other=0.0)
        h = tl.dot(xt.to(DOT), wd.to(DOT), acc=h, input_precision=PREC, out_dtype=ACC)
    return h + tl.load(bd_ptr + rr, mask=rmask, other=0.0)[None, :]


@triton.jit
def _activation(x_ptr, wdT_ptr, bd_ptr, base, t, tmask, C, R, j0, stride_c, seed_lo, seed_hi, threshold,
                keep_scale, ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                BIG_INDEX: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                ACC: tl.constexpr):
    """Columns [j0, j0 + BLOCK_R) of dropout(act(h)) and of act'(h) (times the same mask), in the
    accumulator's precision: these are (positions, r) tiles, too big for the fp64 the pooled adapter
    affords on its (samples, r) ones."""
    h = _hidden(x_ptr, wdT_ptr, bd_ptr, base, tmask, C, R, j0, stride_c, DOT, PREC, BIG_INDEX, BLOCK_T, BLOCK_C,
                BLOCK_R, ACC)
    a, da = act_fwd_bwd(h, ACT, False)
    index = t[:, None] * R + (j0 + tl.arange(0, BLOCK_R))[None, :]  # dropout index: position * r + j
    a = dropped(a, index, seed_lo, seed_hi, threshold, keep_scale, HAS_DROPOUT)
    da = dropped(da, index, seed_lo, seed_hi, threshold, keep_scale, HAS_DROPOUT)
    return a, da


@triton.jit
def _residual_store(in_ptr, out_ptr, base, tmask, cc, cmask, stride_c, v, ACC: tl.constexpr):
    """out = in + v for channels cc of the tile."""
    m = tmask[:, None] & cmask[None, :]
    off = base[:, None] + cc[None, :] * stride_c
    xt = tl.load(in_ptr + off, mask=m, other=0.0).to(ACC)
    tl.store(out_ptr + off, (xt + v).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _pixel_fwd_kernel(x_ptr, y_ptr, wdT_ptr, bd_ptr, wuT_ptr, bu_ptr, scale_ptr, a_ptr, T, C, R, HW,
                      stride_b, stride_c, stride_p, seed_lo, seed_hi, threshold, keep_scale,
                      ACT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT: tl.constexpr,
                      PREC: tl.constexpr, ACC: tl.constexpr, SPLIT_R: tl.constexpr, BIG_INDEX: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """y = x + s (dropout(act(x W_d^T + b_d)) W_u^T + b_u) for BLOCK_T positions. SPLIT_R (r > BLOCK_R):
    the hidden layer is formed BLOCK_R columns at a time into a_ptr (positions, r), then read back by
    the up-projection; otherwise it stays in registers (a_ptr unused)."""
    t, tmask, base = _tile(tl.program_id(0), T, HW, stride_b, stride_c, stride_p, BLOCK_T)
    s = tl.load(scale_ptr).to(ACC) if HAS_SCALE else 1.0
    if SPLIT_R:
        for j0 in range(0, R, BLOCK_R):
            a, _ = _activation(x_ptr, wdT_ptr, bd_ptr, base, t, tmask, C, R, j0, stride_c, seed_lo, seed_hi,
                               threshold, keep_scale, ACT, HAS_DROPOUT, DOT, PREC, BIG_INDEX, BLOCK_T, BLOCK_C,
                               BLOCK_R, ACC)
            rr = j0 + tl.arange(0, BLOCK_R)
            tl.store(a_ptr + t[:, None] * R + rr[None, :], a.to(a_ptr.dtype.element_ty),
                     mask=tmask[:, None] & (rr < R)[None, :])
        tl.debug_barrier()  # the tile's columns of a were written by other threads of this program
        for c0 in range(0, C, BLOCK_C):
            cc, cmask = _cols(c0, C, BIG_INDEX, BLOCK_C)
            u = tl.zeros((BLOCK_T, BLOCK_C), dtype=ACC)
            for j0 in range(0, R, BLOCK_R):
                rr = j0 + tl.arange(0, BLOCK_R)
                rmask = rr < R
                a = tl.load(a_ptr + t[:, None] * R + rr[None, :], mask=tmask[:, None] & rmask[None, :], other=0.0)
                wu = tl.load(wuT_ptr + rr[:, None] * C + cc[None, :], mask=rmask[:, None] & cmask[None, :],
                             other=0.0)
                u = tl.dot(a.to(DOT), wu.to(DOT), acc=u, input_precision=PREC, out_dtype=ACC)
            u = u + tl.load(bu_ptr + cc, mask=cmask, other=0.0)[None, :]
            _residual_store(x_ptr, y_ptr, base, tmask, cc, cmask, stride_c, s * u, ACC)
    else:
        a, _ = _activation(x_ptr, wdT_ptr, bd_ptr, base, t, tmask, C, R, 0, stride_c, seed_lo, seed_hi, threshold,
                           keep_scale, ACT, HAS_DROPOUT, DOT, PREC, BIG_INDEX, BLOCK_T, BLOCK_C, BLOCK_R, ACC)
        a = a.to(DOT)
        rr = tl.arange(0, BLOCK_R)
        rmask = rr < R
        for c0 in range(0, C, BLOCK_C):
            cc, cmask = _cols(c0, C, BIG_INDEX, BLOCK_C)
            wu = tl.load(wuT_ptr + rr[:, None] * C + cc[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            u = tl.dot(a, wu.to(DOT), input_precision=PREC, out_dtype=ACC)
            u = u + tl.load(bu_ptr + cc, mask=cmask, other=0.0)[None, :]
            _residual_store(x_ptr, y_ptr, base, tmask, cc, cmask, stride_c, s * u, ACC)


@triton.jit
def _bwd_columns(gy_ptr, x_ptr, gh_ptr, a_ptr, wdT_ptr, bd_ptr, wu_ptr, base, t, tmask, s, C, R, j0, stride_c,
                 seed_lo, seed_hi, threshold, keep_scale, ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                 DOT: tl.constexpr, PREC: tl.constexpr, BIG_INDEX: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr):
    """Columns [j0, j0 + BLOCK_R) of g_h = s (grad_y W_u) act'(h) and of a, both stored; returns g_h and
    sum(a * grad_y W_u) (this tile's part of d/ds, less the bias term)."""
    a, da = _activation(x_ptr, wdT_ptr, bd_ptr, base, t, tmask, C, R, j0, stride_c, seed_lo, seed_hi, threshold,
                        keep_scale, ACT, HAS_DROPOUT, DOT, PREC, BIG_INDEX, BLOCK_T, BLOCK_C, BLOCK_R, ACC)
    rr = j0 + tl.arange(0, BLOCK_R)
    rmask = rr < R
    ga = tl.zeros((BLOCK_T, BLOCK_R), dtype=ACC)
    for c0 in range(0, C, BLOCK_C):  # g_a = grad_y W_u
        cc, cmask = _cols(c0, C, BIG_INDEX, BLOCK_C)
        g = tl.load(gy_ptr + base[:, None] + cc[None, :] * stride_c, mask=tmask[:, None] & cmask[None, :], other=0.0)
        wu = tl.load(wu_ptr + cc[:, None] * R + rr[None, :], mask=cmask[:, None] & rmask[None, :], other=0.0)
        ga = tl.dot(g.to(DOT), wu.to(DOT), acc=ga, input_precision=PREC, out_dtype=ACC)
    gh = s * ga * da
    m_r = tmask[:, None] & rmask[None, :]
    tl.store(gh_ptr + t[:, None] * R + rr[None, :], gh, mask=m_r)
    tl.store(a_ptr + t[:, None] * R + rr[None, :], a, mask=m_r)
    return gh, tl.sum(tl.sum(a * ga, axis=1), axis=0)


@triton.jit
def _pixel_bwd_kernel(gy_ptr, x_ptr, gx_ptr, gh_ptr, a_ptr, gs_ptr, wdT_ptr, bd_ptr, wd_ptr, wu_ptr,
                      scale_ptr, T, C, R, HW, stride_b, stride_c, stride_p, seed_lo, seed_hi, threshold,
                      keep_scale, ACT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                      DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, SPLIT_R: tl.constexpr,
                      BIG_INDEX: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_R: tl.constexpr):
    """grad_x = grad_y + g_h W_d with g_h = s (grad_y W_u) act'(h) (dropout masked), for BLOCK_T
    positions; writes g_h and a = dropout(act(h)) (positions, r) for the weight gradients, and the
    program's part of d/ds (d/ds sum(grad_y * s (a W_u^T + b_u)) = sum a * g_a + b_u . sum_t grad_y, the
    last term on the host). SPLIT_R: BLOCK_R columns of h at a time, g_h read back from gh_ptr."""
    pid = tl.program_id(0)
    t, tmask, base = _tile(pid, T, HW, stride_b, stride_c, stride_p, BLOCK_T)
    s = tl.load(scale_ptr).to(ACC) if HAS_SCALE else 1.0
    if SPLIT_R:
        gs = tl.full((), 0.0, ACC)
        for j0 in range(0, R, BLOCK_R):
            _, gs_j = _bwd_columns(gy_ptr, x_ptr, gh_ptr, a_ptr, wdT_ptr, bd_ptr, wu_ptr, base, t, tmask, s, C, R,
                                   j0, stride_c, seed_lo, seed_hi, threshold, keep_scale, ACT, HAS_DROPOUT, DOT,
                                   PREC, BIG_INDEX, BLOCK_T, BLOCK_C, BLOCK_R, ACC)
            gs += gs_j
        if HAS_SCALE:
            tl.store(gs_ptr + pid, gs)
        tl.debug_barrier()  # the tile's columns of g_h were written by other threads of this program
        for c0 in range(0, C, BLOCK_C):  # grad_x = grad_y + g_h W_d
            cc, cmask = _cols(c0, C, BIG_INDEX, BLOCK_C)
            gm = tl.zeros((BLOCK_T, BLOCK_C), dtype=ACC)
            for j0 in range(0, R, BLOCK_R):
                rr = j0 + tl.arange(0, BLOCK_R)
                rmask = rr < R
                gh = tl.load(gh_ptr + t[:, None] * R + rr[None, :], mask=tmask[:, None] & rmask[None, :], other=0.0)
                wd = tl.load(wd_ptr + rr[:, None] * C + cc[None, :], mask=rmask[:, None] & cmask[None, :],
                             other=0.0)
                gm = tl.dot(gh.to(DOT), wd.to(DOT), acc=gm, input_precision=PREC, out_dtype=ACC)
            _residual_store(gy_ptr, gx_ptr, base, tmask, cc, cmask, stride_c, gm, ACC)
    else:
        gh, gs = _bwd_columns(gy_ptr, x_ptr, gh_ptr, a_ptr, wdT_ptr, bd_ptr, wu_ptr, base, t, tmask, s, C, R, 0,
                              stride_c, seed_lo, seed_hi, threshold, keep_scale, ACT, HAS_DROPOUT, DOT, PREC,
                              BIG_INDEX, BLOCK_T, BLOCK_C, BLOCK_R, ACC)
        if HAS_SCALE:
            tl.store(gs_ptr + pid, gs)
        gh = gh.to(DOT)
        rr = tl.arange(0, BLOCK_R)
        for c0 in range(0, C, BLOCK_C):  # grad_x = grad_y + g_h W_d
            cc, cmask = _cols(c0, C, BIG_INDEX, BLOCK_C)
            wd = tl.load(wd_ptr + rr[:, None] * C + cc[None, :], mask=(rr < R)[:, None] & cmask[None, :], other=0.0)
            gm = tl.dot(gh, wd.to(DOT), input_precision=PREC, out_dtype=ACC)
            _residual_store(gy_ptr, gx_ptr, base, tmask, cc, cmask, stride_c, gm, ACC)


def _layout(x: Tensor):
    """(positions T, channels C, positions per sample HW, stride_b, stride_c, stride_p) of x."""
    if x.dim() == 2:
        if not x.is_contiguous():
            raise RuntimeError("pixel_adapter_triton: tokens x (T, C) must be contiguous")
        return x.shape[0], x.shape[1], max(x.shape[0], 1), 0, 1, x.shape[1]
    if x.dim() != 4:
        raise RuntimeError(f"pixel_adapter_triton: x must be (B, C, H, W) or tokens (T, C), got {tuple(x.shape)}")
    B, C, H, W = x.shape
    HW = H * W
    if x.is_contiguous():
        return B * HW, C, max(HW, 1), C * HW, HW, 1
    if x.is_contiguous(memory_format=torch.channels_last):
        return B * HW, C, max(B * HW, 1), 0, 1, C
    raise RuntimeError("pixel_adapter_triton: x must be contiguous or channels_last")


# hidden units per register tile (fp32 / fp64 x, and fp16 / bf16 x); wider r is formed in chunks of
# this many (SPLIT_R). The largest that keep the backward's (positions, r) tiles of h, a, act'(h) and
# g_a in registers at 8 warps (fp32 spills at r = 128; ptxas -v, sm_90), far below the per-block
# shared-memory limit.
_MAX_BLOCK_R = 64
_MAX_BLOCK_R_HALF = 128
_INT32_MAX = 2**31 - 1


class _Config(NamedTuple):
    acc: torch.dtype        # accumulator / activation dtype
    dot_dtype: torch.dtype  # dtype the products run in (and of the forward's hidden scratch)
    DOT: object             # the same, as a Triton type
    PREC: str               # tl.dot input_precision
    ACC: object             # acc as a Triton type
    BLOCK_T: int
    BLOCK_C: int
    BLOCK_R: int
    SPLIT_R: bool           # r > BLOCK_R: the hidden layer is formed BLOCK_R columns at a time
    BIG_INDEX: bool         # channel offsets (c * stride_c) can pass 2^31: int64 channel indices
    num_warps: int


def _config(dtype: torch.dtype, C: int, R: int, stride_c: int) -> _Config:
    """Launch configuration of both kernels: a function of x's dtype, C, r and x's channel stride only."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    half = dtype in (torch.float16, torch.bfloat16)
    dot_dtype = dtype if half else acc
    # fp32 products in full precision (not TF32): the tolerance model compares with fp32 torch
    prec = "tf32" if half else "ieee"
    if half and INTERPRETED:
        # The interpreter's fp32 -> bf16 casts and bf16 dots do not round as a GPU does (measured: a
        # 16x16 dot of bf16-rounded inputs off by 0.09): it runs the products in fp32, which tests the
        # kernel's logic; the bf16 tensor-core path itself is tested on a GPU.
        dot_dtype, prec = torch.float32, "ieee"
    tl_of = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}
    block_r = min(max(16, triton.next_power_of_2(R)), _MAX_BLOCK_R_HALF if half else _MAX_BLOCK_R)
    block_t = 64 if half else 32
    block_c = 64 if block_r <= 64 else 32
    big = max(C, 1) * max(stride_c, 1) > _INT32_MAX
    # 8 warps: at 4 the fp32 / fp64 products (FMA, not tensor cores: full precision) and the
    # backward's four (positions, r) tiles exceed 255 registers and spill (ptxas -v, sm_90)
    return _Config(acc, dot_dtype, tl_of[dot_dtype], prec, tl_of[acc], block_t, block_c, block_r, R > block_r,
                   big, 8)


def _meta(cfg: _Config, activation: int, scale, dropout: float) -> dict:
    """The constexpr arguments and launch options both kernels take."""
    return dict(ACT=activation, HAS_SCALE=scale is not None, HAS_DROPOUT=dropout > 0, DOT=cfg.DOT, PREC=cfg.PREC,
                ACC=cfg.ACC, SPLIT_R=cfg.SPLIT_R, BIG_INDEX=cfg.BIG_INDEX, BLOCK_T=cfg.BLOCK_T,
                BLOCK_C=cfg.BLOCK_C, BLOCK_R=cfg.BLOCK_R, num_warps=cfg.num_warps)


def _checks(name, x, down_w, down_b, up_w, up_b, scale, activation, dropout):
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise RuntimeError(f"{name}: x must be a floating-point tensor, got {x.dtype}")
    check_activation(name, activation)
    if not 0 <= dropout < 1:
        raise RuntimeError(f"{name}: dropout must be in [0, 1), got {dropout}")
    C = x.shape[1] if x.dim() == 4 else x.shape[-1]
    R = down_w.shape[0]
    if C < 1 or R < 1:
        raise RuntimeError(f"{name}: needs C >= 1 and r >= 1, got C = {C}, r = {R}")
    if C * R > _INT32_MAX:
        raise RuntimeError(f"{name}: down_w (r, C) must have fewer than 2^31 elements, got r = {R}, C = {C}")
    dev = x.device
    check_adapter_params(name, down_w, down_b, up_w, up_b, scale, C, R, dev)
    return R


def _weights(acc, down_w, down_b, up_w, up_b):
    wd = down_w.detach().to(acc).contiguous()
    wu = up_w.detach().to(acc).contiguous()
    return (wd.t().contiguous(), down_b.detach().to(acc).contiguous(), wd, wu, wu.t().contiguous(),
            up_b.detach().to(acc).contiguous())


@triton_op("fastcascade::pixel_adapter_triton")
def pixel_adapter_triton(x: Tensor, down_w: Tensor, down_b: Tensor, up_w: Tensor, up_b: Tensor,
                         scale: Tensor | None, activation: int, dropout: float, seed: int) -> Tensor:
    name = "pixel_adapter_triton"
    R = _checks(name, x, down_w, down_b, up_w, up_b, scale, activation, dropout)
    T, C, HW, sb, sc, sp = _layout(x)
    y = torch.empty_like(x)
    if T == 0:
        return y
    cfg = _config(x.dtype, C, R, sc)
    wdT, bd, _, _, wuT, bu = _weights(cfg.acc, down_w, down_b, up_w, up_b)
    s = scale if scale is not None else bd  # a placeholder pointer when there is no scale
    # the hidden activations when they are formed in chunks (read back by the same program)
    a = torch.empty((T, R) if cfg.SPLIT_R else (1,), device=x.device, dtype=cfg.dot_dtype)
    seed_lo, seed_hi, thr, keep_scale = dropout_args(dropout, seed)
    launch(_pixel_fwd_kernel, (triton.cdiv(T, cfg.BLOCK_T),),
           x, y, wdT, bd, wuT, bu, s, a, T, C, R, HW, sb, sc, sp, seed_lo, seed_hi, thr, keep_scale,
           **_meta(cfg, activation, scale, dropout))
    return y


@triton_op("fastcascade::_pixel_adapter_backward_triton")
def pixel_adapter_backward_triton(grad_y: Tensor, x: Tensor, down_w: Tensor, down_b: Tensor, up_w: Tensor,
                                  up_b: Tensor, scale: Tensor | None, activation: int, dropout: float,
                                  seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    name = "_pixel_adapter_backward_triton"
    R = _checks(name, x, down_w, down_b, up_w, up_b, scale, activation, dropout)
    if grad_y.shape != x.shape or grad_y.dtype != x.dtype or grad_y.stride() != x.stride():
        raise RuntimeError(f"{name}: grad_y must have x's shape, dtype and layout, got {tuple(grad_y.shape)} "
                         f"{grad_y.dtype} strides {grad_y.stride()} vs {tuple(x.shape)} {x.dtype} {x.stride()}")
    T, C, HW, sb, sc, sp = _layout(x)
    cfg = _config(x.dtype, C, R, sc)
    acc = cfg.acc
    wdT, bd, wd, wu, _, bu = _weights(acc, down_w, down_b, up_w, up_b)
    gx = torch.empty_like(x)
    gh = torch.empty((T, R), device=x.device, dtype=acc)
    a = torch.empty((T, R), device=x.device, dtype=acc)
    n_prog = triton.cdiv(T, cfg.BLOCK_T)
    gs_part = torch.zeros((n_prog if scale is not None else 0,), device=x.device, dtype=acc)
    if T > 0:
        seed_lo, seed_hi, thr, keep_scale = dropout_args(dropout, seed)
        s = scale if scale is not None else bd
        launch(_pixel_bwd_kernel, (n_prog,),
               grad_y, x, gx, gh, a, gs_part, wdT, bd, wd, wu, s, T, C, R, HW, sb, sc, sp, seed_lo, seed_hi,
               thr, keep_scale, **_meta(cfg, activation, scale, dropout))
    # (positions, C) views of grad_y and x, positions in (B, H, W) order as the rows of gh and a
    g2 = (grad_y.movedim(1, -1) if x.dim() == 4 else grad_y).reshape(T, C).to(acc)
    x2 = (x.movedim(1, -1) if x.dim() == 4 else x).reshape(T, C).to(acc)
    s = scale.detach().to(acc) if scale is not None else torch.ones((), device=x.device, dtype=acc)
    g_up_w = torch.mm(g2.t(), a) * s
    g_sum = g2.sum(0)
    g_up_b = g_sum * s
    g_down_w = torch.mm(gh.t(), x2)
    g_down_b = gh.sum(0)
    g_scale = ((gs_part.sum() + (g_sum * bu).sum()).reshape(scale.shape).to(scale.dtype) if scale is not None
               else x.new_empty((0,), dtype=acc))
    return (gx, g_down_w.to(down_w.dtype), g_down_b.to(down_b.dtype), g_up_w.to(up_w.dtype),
            g_up_b.to(up_b.dtype), g_scale)
