"""Triton kernels for the pixel (token) residual adapter (fastcascade.reference._pixel_adapter).

Two custom ops, defined with ``torch.library.triton_op`` (fake kernels and autograd are registered
in fastcascade/_ops.py, shared with the C++ twins):

* ``fastcascade::pixel_adapter_triton``
    (x, down_w, down_b, up_w, up_b, scale, activation, dropout, seed) -> y
* ``fastcascade::pixel_adapter_backward_triton``
    (grad_y, x, down_w, down_b, up_w, up_b, scale, activation, dropout, seed)
    -> (grad_x, grad_down_w, grad_down_b, grad_up_w, grad_up_b, grad_scale)

x is (B, C, H, W), contiguous or channels_last, or tokens (T, C). A program owns BLOCK_T positions:
the r-wide hidden layer h = x W_d^T + b_d is accumulated over channel chunks with tl.dot and stays
in registers; activation and dropout (the mask hashed from (seed, position * r + j), identical to
the C++ kernels') follow, then a second loop over channel chunks writes y = x + s (a W_u^T + b_u),
re-reading x from cache. Half-precision x runs the products in x's dtype with fp32 accumulation
(the weights rounded to it, as nn.Linear under autocast; fp32 products under TRITON_INTERPRET=1,
whose bf16 arithmetic does not round as a GPU does); fp32 and fp64 x in full precision.

Backward recomputes h from x, writes grad_x = grad_y + g_h W_d and the (positions, r) matrices
g_h and a; the weight gradients are then products of those with grad_y and x (torch.mm, over all
positions), and d/ds sums per-program partials in program order. No atomics: reproducible bitwise.
"""

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import launch, triton_op
from .adapter import _act_fwd_bwd, _check_activation, _check_param, _check_scale, _dropout_args, _dropped

__all__ = ["pixel_adapter_backward_triton", "pixel_adapter_triton"]

@triton.jit
def _tile(pid, T, HW, stride_b, stride_c, stride_p, BLOCK_T: tl.constexpr):
    """Positions of the program's tile, their mask and their base offsets into x."""
    t = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    base = (t // HW) * stride_b + (t % HW) * stride_p
    return t, tmask, base


@triton.jit
def _hidden(x_ptr, wdT_ptr, bd_ptr, base, tmask, C, R, stride_c, DOT: tl.constexpr,
            PREC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
            ACC: tl.constexpr):
    """h = x W_d^T + b_d for the tile: (BLOCK_T, BLOCK_R), zero in the padded columns."""
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < R
    h = tl.zeros((BLOCK_T, BLOCK_R), dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cmask = cc < C
        xt = tl.load(x_ptr + base[:, None] + cc[None, :] * stride_c, mask=tmask[:, None] & cmask[None, :], other=0.0)
        wd = tl.load(wdT_ptr + cc[:, None] * R + rr[None, :], mask=cmask[:, None] & rmask[None, :], other=0.0)
        h = tl.dot(xt.to(DOT), wd.to(DOT), acc=h, input_precision=PREC, out_dtype=ACC)
    return h + tl.load(bd_ptr + rr, mask=rmask, other=0.0)[None, :]


@triton.jit
def _pixel_fwd_kernel(x_ptr, y_ptr, wdT_ptr, bd_ptr, wuT_ptr, bu_ptr, scale_ptr, T, C, R, HW,
                      stride_b, stride_c, stride_p, seed_lo, seed_hi, threshold, keep_scale,
                      ACT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT: tl.constexpr,
                      PREC: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    t, tmask, base = _tile(tl.program_id(0), T, HW, stride_b, stride_c, stride_p, BLOCK_T)
    h = _hidden(x_ptr, wdT_ptr, bd_ptr, base, tmask, C, R, stride_c, DOT, PREC, BLOCK_T, BLOCK_C, BLOCK_R, ACC)
    a, _ = _act_fwd_bwd(h, ACT)
    index = t[:, None] * R + tl.arange(0, BLOCK_R)[None, :]  # dropout index: position * r + j
    a = _dropped(a, index, seed_lo, seed_hi, threshold, keep_scale, HAS_DROPOUT).to(DOT)
    s = tl.load(scale_ptr).to(ACC) if HAS_SCALE else 1.0
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < R
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cmask = cc < C
        wu = tl.load(wuT_ptr + rr[:, None] * C + cc[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        u = tl.dot(a, wu.to(DOT), input_precision=PREC, out_dtype=ACC)
        u = u + tl.load(bu_ptr + cc, mask=cmask, other=0.0)[None, :]
        m = tmask[:, None] & cmask[None, :]
        off = base[:, None] + cc[None, :] * stride_c
        xt = tl.load(x_ptr + off, mask=m, other=0.0).to(ACC)
        tl.store(y_ptr + off, (xt + s * u).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _pixel_bwd_kernel(gy_ptr, x_ptr, gx_ptr, gh_ptr, a_ptr, gs_ptr, wdT_ptr, bd_ptr, wd_ptr, wu_ptr,
                      scale_ptr, T, C, R, HW, stride_b, stride_c, stride_p, seed_lo, seed_hi, threshold,
                      keep_scale, ACT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                      DOT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    t, tmask, base = _tile(pid, T, HW, stride_b, stride_c, stride_p, BLOCK_T)
    h = _hidden(x_ptr, wdT_ptr, bd_ptr, base, tmask, C, R, stride_c, DOT, PREC, BLOCK_T, BLOCK_C, BLOCK_R, ACC)
    a, da = _act_fwd_bwd(h, ACT)
    index = t[:, None] * R + tl.arange(0, BLOCK_R)[None, :]  # dropout index: position * r + j
    a = _dropped(a, index, seed_lo, seed_hi, threshold, keep_scale, HAS_DROPOUT)
    da = _dropped(da, index, seed_lo, seed_hi, threshold, keep_scale, HAS_DROPOUT)
    s = tl.load(scale_ptr).to(ACC) if HAS_SCALE else 1.0
    rr = tl.arange(0, BLOCK_R)
    rmask = rr < R
    ga = tl.zeros((BLOCK_T, BLOCK_R), dtype=ACC)
    for c0 in range(0, C, BLOCK_C):  # g_a = grad_y W_u
        cc = c0 + tl.arange(0, BLOCK_C)
        cmask = cc < C
        m = tmask[:, None] & cmask[None, :]
        g = tl.load(gy_ptr + base[:, None] + cc[None, :] * stride_c, mask=m, other=0.0)
        wu = tl.load(wu_ptr + cc[:, None] * R + rr[None, :], mask=cmask[:, None] & rmask[None, :], other=0.0)
        ga = tl.dot(g.to(DOT), wu.to(DOT), acc=ga, input_precision=PREC, out_dtype=ACC)
    if HAS_SCALE:  # d/ds sum(grad_y * s (a W_u^T + b_u)) = sum a * g_a + (b_u . sum_t grad_y, on the host)
        tl.store(gs_ptr + pid, tl.sum(tl.sum(a * ga, axis=1), axis=0))
    gh = s * ga * da
    m_r = tmask[:, None] & rmask[None, :]
    tl.store(gh_ptr + t[:, None] * R + rr[None, :], gh, mask=m_r)
    tl.store(a_ptr + t[:, None] * R + rr[None, :], a, mask=m_r)
    gh = gh.to(DOT)
    for c0 in range(0, C, BLOCK_C):  # grad_x = grad_y + g_h W_d
        cc = c0 + tl.arange(0, BLOCK_C)
        cmask = cc < C
        wd = tl.load(wd_ptr + rr[:, None] * C + cc[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        gm = tl.dot(gh, wd.to(DOT), input_precision=PREC, out_dtype=ACC)
        m = tmask[:, None] & cmask[None, :]
        off = base[:, None] + cc[None, :] * stride_c
        g = tl.load(gy_ptr + off, mask=m, other=0.0).to(ACC)
        tl.store(gx_ptr + off, (g + gm).to(gx_ptr.dtype.element_ty), mask=m)


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


def _config(x: Tensor, R: int):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    half = x.dtype in (torch.float16, torch.bfloat16)
    dot = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(x.dtype, tl.float64 if acc == torch.float64
                                                                      else tl.float32)
    block_r = max(16, triton.next_power_of_2(R))
    block_t = 64 if half else 32
    block_c = 64 if block_r <= 64 else 32
    # fp32 products in full precision (not TF32): the tolerance model compares with fp32 torch
    prec = "tf32" if half else "ieee"
    if half and os.environ.get("TRITON_INTERPRET") == "1":
        # The interpreter's fp32 -> bf16 casts and bf16 dots do not round as a GPU does (measured: a
        # 16x16 dot of bf16-rounded inputs off by 0.09): it runs the products in fp32, which tests the
        # kernel's logic; the bf16 tensor-core path itself is tested on a GPU.
        dot, prec = tl.float32, "ieee"
    return acc, dot, prec, (tl.float64 if acc == torch.float64 else tl.float32), block_t, block_c, block_r


def _checks(name, x, down_w, down_b, up_w, up_b, scale, activation, dropout):
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise RuntimeError(f"{name}: x must be a floating-point tensor, got {x.dtype}")
    _check_activation(name, activation)
    if not 0 <= dropout < 1:
        raise RuntimeError(f"{name}: dropout must be in [0, 1), got {dropout}")
    C = x.shape[1] if x.dim() == 4 else x.shape[-1]
    R = down_w.shape[0]
    if C < 1 or R < 1:
        raise RuntimeError(f"{name}: needs C >= 1 and r >= 1, got C = {C}, r = {R}")
    dev = x.device
    _check_param(name, "down_w", down_w, (R, C), dev)
    _check_param(name, "down_b", down_b, (R,), dev)
    _check_param(name, "up_w", up_w, (C, R), dev)
    _check_param(name, "up_b", up_b, (C,), dev)
    _check_scale(name, scale, dev)
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
    acc, dot, prec, acc_tl, bt, bc, br = _config(x, R)
    wdT, bd, _, _, wuT, bu = _weights(acc, down_w, down_b, up_w, up_b)
    s = scale if scale is not None else bd  # a placeholder pointer when there is no scale
    seed_lo, seed_hi, thr, keep_scale = _dropout_args(dropout, seed)
    launch(_pixel_fwd_kernel, (triton.cdiv(T, bt),),
        x, y, wdT, bd, wuT, bu, s, T, C, R, HW, sb, sc, sp, seed_lo, seed_hi, thr, keep_scale,
        ACT=activation, HAS_SCALE=scale is not None, HAS_DROPOUT=dropout > 0, DOT=dot, PREC=prec, ACC=acc_tl,
        BLOCK_T=bt, BLOCK_C=bc, BLOCK_R=br)
    return y


@triton_op("fastcascade::pixel_adapter_backward_triton")
def pixel_adapter_backward_triton(grad_y: Tensor, x: Tensor, down_w: Tensor, down_b: Tensor, up_w: Tensor,
                                  up_b: Tensor, scale: Tensor | None, activation: int, dropout: float,
                                  seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    name = "pixel_adapter_backward_triton"
    R = _checks(name, x, down_w, down_b, up_w, up_b, scale, activation, dropout)
    if grad_y.shape != x.shape or grad_y.dtype != x.dtype or grad_y.stride() != x.stride():
        raise RuntimeError(f"{name}: grad_y must have x's shape, dtype and layout, got {tuple(grad_y.shape)} "
                         f"{grad_y.dtype} strides {grad_y.stride()} vs {tuple(x.shape)} {x.dtype} {x.stride()}")
    T, C, HW, sb, sc, sp = _layout(x)
    acc, dot, prec, acc_tl, bt, bc, br = _config(x, R)
    wdT, bd, wd, wu, _, bu = _weights(acc, down_w, down_b, up_w, up_b)
    gx = torch.empty_like(x)
    gh = torch.empty((T, R), device=x.device, dtype=acc)
    a = torch.empty((T, R), device=x.device, dtype=acc)
    n_prog = triton.cdiv(T, bt)
    gs_part = torch.zeros((n_prog if scale is not None else 0,), device=x.device, dtype=acc)
    if T > 0:
        seed_lo, seed_hi, thr, keep_scale = _dropout_args(dropout, seed)
        s = scale if scale is not None else bd
        launch(_pixel_bwd_kernel, (n_prog,),
            grad_y, x, gx, gh, a, gs_part, wdT, bd, wd, wu, s, T, C, R, HW, sb, sc, sp, seed_lo, seed_hi,
            thr, keep_scale, ACT=activation, HAS_SCALE=scale is not None, HAS_DROPOUT=dropout > 0, DOT=dot,
            PREC=prec, ACC=acc_tl, BLOCK_T=bt, BLOCK_C=bc, BLOCK_R=br)
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
