"""Triton kernels of the fused Dice + softmax focal loss (twin of csrc/dice_focal/).

Two custom ops are defined with ``torch.library.triton_op`` in the ``fastcascade`` namespace:

* ``fastcascade::dice_focal_triton`` -> (loss, inter, card, focal_stats)
* ``fastcascade::_dice_focal_backward_triton`` -> grad_logits

Same schema and semantics as the C++ ops (csrc/fastcascade.cpp). logits (B, C, S), target (B, S).
Each program owns a tile of BLOCK_R pixels of one image with all their classes in registers, and
writes one partial row [focal sum, normaliser, inter (C), card (C)]; the partials of each image are
then added with ``torch.sum`` over a fixed layout. No atomics. The backward recomputes the softmax
over the same tiles and writes the gradient.

Fake kernels and autograd are registered in fastcascade/_ops/dice_focal.py.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import FLOAT_DTYPES, launch, precise_softmax, softmax_terms, split_float, triton_op

__all__ = ["dice_focal_triton", "dice_focal_backward_triton"]

_TILE_ELEMS = 2048
_MAX_C = 4096  # whole pixels (all classes) live in one register tile


@triton.jit
def _pixel_tile(x_ptr, t_ptr, w_ptr, pid, C, S, n_sblk, ignore_index, gamma,
                HAS_W: tl.constexpr, CT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Softmax of a tile of pixels and the focal terms (no smoothing): softmax_focal's tile numerics."""
    b = pid // n_sblk
    sb = pid - b * n_sblk
    b64 = b.to(tl.int64)
    s = sb.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = s < S
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    offs = b64 * C * S + cols.to(tl.int64)[None, :] * S + s[:, None]
    mask2 = rmask[:, None] & cmask[None, :]
    t = tl.load(t_ptr + b64 * S + s, mask=rmask, other=0)
    ign = t == ignore_index
    valid = (t >= 0) & (t < C)

    x = tl.load(x_ptr + offs, mask=mask2, other=0).to(CT)
    x = tl.where(cmask[None, :], x, float("-inf"))
    is_am, lp, p, om, inv = precise_softmax(x, cols, cmask)  # focal.py's: log p and 1 - p stay precise
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=0).to(CT)
        wt = tl.load(w_ptr + tl.where(valid, t, 0), mask=rmask & valid, other=0).to(CT)
    else:
        w = tl.where(cmask, 1.0, 0.0).to(CT)
        wt = tl.full([BLOCK_R], 1.0, CT)
    is_t = cols[None, :] == t[:, None]
    return b64, cols, cmask, offs, mask2, rmask, ign, valid, is_am, is_t, lp, p, om, inv, w, wt


@triton.jit
def _dice_focal_fwd_kernel(
    x_ptr, t_ptr, w_ptr, part_ptr, C, S, n_sblk, ignore_index, gamma_hi, gamma_lo,
    HAS_W: tl.constexpr, USE_FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    CT: tl.constexpr = tl.float64 if USE_FP64 else tl.float32
    pid = tl.program_id(0)
    gamma = tl.cast(gamma_hi, CT) + tl.cast(gamma_lo, CT)
    b64, cols, cmask, offs, mask2, rmask, ign, valid, is_am, is_t, lp, p, om, inv, w, wt = _pixel_tile(
        x_ptr, t_ptr, w_ptr, pid, C, S, n_sblk, ignore_index, gamma, HAS_W, CT, BLOCK_R, BLOCK_C)
    loss_c, _a = softmax_terms(lp, p, om, is_t, w[None, :], 0.0, 1.0, gamma, False)
    loss_r = tl.where(ign, 0.0, tl.where(valid, tl.sum(loss_c, axis=1), float("nan")))
    den_r = tl.where(ign, 0.0, tl.where(valid, wt, float("nan")))
    # kept pixels count 1, pixels with a target outside [0, C) NaN, ignored ones and padding nothing
    counts = (rmask & ~ign)[:, None] & cmask[None, :]
    kf = tl.where(valid, 1.0, float("nan"))[:, None]
    y = tl.where(is_t, 1.0, 0.0)
    inter = tl.sum(tl.where(counts, p * y * kf, 0.0), axis=0)
    card = tl.sum(tl.where(counts, (p + y) * kf, 0.0), axis=0)
    P = 2 * C + 2
    base = part_ptr + pid.to(tl.int64) * P
    tl.store(base, tl.sum(tl.where(rmask, loss_r, 0.0), axis=0))
    tl.store(base + 1, tl.sum(tl.where(rmask, den_r, 0.0), axis=0))
    tl.store(base + 2 + cols, inter, mask=cmask)
    tl.store(base + 2 + C + cols, card, mask=cmask)


@triton.jit
def _dice_focal_bwd_kernel(
    x_ptr, t_ptr, w_ptr, coef_ptr, fs_ptr, grad_ptr, C, S, n_sblk, ignore_index, gamma_hi, gamma_lo,
    HAS_W: tl.constexpr, USE_FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    CT: tl.constexpr = tl.float64 if USE_FP64 else tl.float32
    pid = tl.program_id(0)
    gamma = tl.cast(gamma_hi, CT) + tl.cast(gamma_lo, CT)
    b64, cols, cmask, offs, mask2, rmask, ign, valid, is_am, is_t, lp, p, om, inv, w, wt = _pixel_tile(
        x_ptr, t_ptr, w_ptr, pid, C, S, n_sblk, ignore_index, gamma, HAS_W, CT, BLOCK_R, BLOCK_C)
    _loss_c, a = softmax_terms(lp, p, om, is_t, w[None, :], 0.0, 1.0, gamma, True)
    fs = tl.load(fs_ptr).to(CT)
    a = a * fs
    alpha = tl.load(coef_ptr + b64 * 2 * C + cols, mask=cmask, other=0).to(CT)
    beta = tl.load(coef_ptr + b64 * 2 * C + C + cols, mask=cmask, other=0).to(CT)
    v = alpha[None, :] + tl.where(is_t, beta[None, :], 0.0)
    # grad = a - p sum(a) + p (v - sum(p v)); for the arg-max class both brackets cancel as p -> 1,
    # so they are formed from 1 - p and the sums over the other classes
    a_am = tl.sum(tl.where(is_am, a, 0.0), axis=1)
    rest_a = tl.sum(tl.where(is_am, 0.0, a), axis=1)
    v_am = tl.sum(tl.where(is_am, v, 0.0), axis=1)
    rest_v = tl.sum(tl.where(is_am, 0.0, p * v), axis=1)
    g = tl.where(is_am, a * om - p * rest_a[:, None] + p * (v * om - rest_v[:, None]),
                 a - p * (a_am + rest_a)[:, None] + p * (v - (inv * v_am + rest_v)[:, None]))
    g = tl.where(ign[:, None], 0.0, tl.where(valid[:, None], g, float("nan")))
    tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask2)


# ----------------------------------------------------------------------------
# host side: checks, tiles, and the (B, C)-sized arithmetic (twin of csrc/dice_focal/dice_focal_math.h)


def _check(logits: Tensor, target: Tensor, weight: Optional[Tensor], name: str):
    if logits.dtype not in FLOAT_DTYPES:
        raise RuntimeError(f"{name}: logits must be float16/bfloat16/float32/float64, got {logits.dtype}")
    if logits.dim() != 3:
        raise RuntimeError(f"{name}: logits must be (B, C, S), got shape {tuple(logits.shape)}")
    B, C, S = logits.shape
    if C < 1 or C > _MAX_C:
        raise RuntimeError(f"{name}: the number of classes C must be in [1, {_MAX_C}], got {C}")
    if target.dtype != torch.int64:
        raise RuntimeError(f"{name}: target must be int64, got {target.dtype}")
    if tuple(target.shape) != (B, S):
        raise RuntimeError(f"{name}: target must have shape ({B}, {S}) matching logits, got {tuple(target.shape)}")
    if target.device != logits.device:
        raise RuntimeError(f"{name}: logits and target must be on the same device")
    if weight is not None and tuple(weight.shape) != (C,):
        raise RuntimeError(f"{name}: weight must have shape ({C},), got {tuple(weight.shape)}")
    return B, C, S


def _tiles(B: int, C: int, S: int):
    """(BLOCK_R, BLOCK_C, programs per image, num_warps) of both kernels: whole pixels in a register tile."""
    block_c = triton.next_power_of_2(C)
    block_r = min(max(1, _TILE_ELEMS // block_c), triton.next_power_of_2(max(S, 1)))
    n_sblk = triton.cdiv(S, block_r)
    num_warps = min(16, max(4, (block_r * block_c) // 256))
    return block_r, block_c, n_sblk, num_warps


def _weights(weight: Optional[Tensor], C: int, acc: torch.dtype, dev) -> Optional[Tensor]:
    return None if weight is None else weight.to(device=dev, dtype=acc).contiguous()


def _dice_class_weights(weight: Optional[Tensor], C: int, include_background: bool, acc, dev) -> Tensor:
    w = torch.ones(C, dtype=acc, device=dev) if weight is None else weight.to(device=dev, dtype=acc).clone()
    if not include_background:
        w[0] = 0
    return w


def _groups(inter: Tensor, card: Tensor, batch_dice: bool):
    return (inter.sum(0, keepdim=True), card.sum(0, keepdim=True)) if batch_dice else (inter, card)


@triton_op("fastcascade::dice_focal_triton")
def dice_focal_triton(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    gamma: float,
    smooth: float,
    lambda_dice: float,
    lambda_focal: float,
    ignore_index: int,
    include_background: bool,
    batch_dice: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B, C, S = _check(logits, target, weight, "dice_focal_triton")
    use_fp64 = logits.dtype == torch.float64
    acc = torch.float64 if use_fp64 else torch.float32
    dev = logits.device
    x, tgt = logits.contiguous(), target.contiguous()
    w = _weights(weight, C, acc, dev)
    block_r, block_c, n_sblk, num_warps = _tiles(B, C, S)
    P = 2 * C + 2
    parts = torch.zeros((B, n_sblk, P), dtype=acc, device=dev)
    g_hi, g_lo = split_float(gamma, use_fp64)
    if B * n_sblk > 0:
        launch(_dice_focal_fwd_kernel, (B * n_sblk,),
               x, tgt, w if w is not None else parts, parts, C, S, n_sblk, int(ignore_index), g_hi, g_lo,
               HAS_W=w is not None, USE_FP64=use_fp64, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
    sums = parts.sum(1)  # (B, P): chunks of each image, a fixed reduction
    inter, card = sums[:, 2:2 + C].clone(), sums[:, 2 + C:].clone()  # outputs alias nothing
    focal_stats = sums[:, :2].sum(0)
    wd = _dice_class_weights(weight, C, include_background, acc, dev)
    loss = torch.zeros((), dtype=acc, device=dev)
    if lambda_dice != 0.0:
        ig, cg = _groups(inter, card, batch_dice)
        dice_gc = 1.0 - (2.0 * ig + smooth) / (cg + smooth)
        loss = loss + lambda_dice * ((dice_gc * wd).sum(1) / wd.sum()).mean()
    if lambda_focal != 0.0:
        loss = loss + lambda_focal * (focal_stats[0] / focal_stats[1])
    return loss.to(logits.dtype), inter, card, focal_stats


@triton_op("fastcascade::_dice_focal_backward_triton")
def dice_focal_backward_triton(
    grad_loss: Tensor,
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    inter: Tensor,
    card: Tensor,
    focal_stats: Tensor,
    gamma: float,
    smooth: float,
    lambda_dice: float,
    lambda_focal: float,
    ignore_index: int,
    include_background: bool,
    batch_dice: bool,
) -> Tensor:
    B, C, S = _check(logits, target, weight, "_dice_focal_backward_triton")
    if tuple(inter.shape) != (B, C) or tuple(card.shape) != (B, C):
        raise RuntimeError(f"_dice_focal_backward_triton: inter and card must have shape ({B}, {C})")
    use_fp64 = logits.dtype == torch.float64
    acc = torch.float64 if use_fp64 else torch.float32
    dev = logits.device
    x, tgt = logits.contiguous(), target.contiguous()
    inter, card, focal_stats = inter.to(acc), card.to(acc), focal_stats.to(acc)
    g = grad_loss.to(acc)
    # d loss / d p_c = alpha_c + beta_c y_c (Dice part), per image; fs scales the focal gradient
    wd = _dice_class_weights(weight, C, include_background, acc, dev)
    ig, cg = _groups(inter, card, batch_dice)
    den = cg + smooth
    scale = g * lambda_dice * wd / (wd.sum() * ig.shape[0])
    alpha = scale * (2.0 * ig + smooth) / (den * den)
    beta = -2.0 * scale / den
    coef = torch.stack([alpha, beta], 1).expand(B, 2, C).contiguous()
    if lambda_dice == 0.0:
        coef = torch.zeros_like(coef)
    cnt = focal_stats[1:2]
    fs = torch.where(cnt != 0, g * lambda_focal / cnt, torch.zeros_like(cnt)).contiguous()

    grad = torch.empty((B, C, S), dtype=logits.dtype, device=dev)
    w = _weights(weight, C, acc, dev)
    block_r, block_c, n_sblk, num_warps = _tiles(B, C, S)
    g_hi, g_lo = split_float(gamma, use_fp64)
    if B * n_sblk > 0:
        launch(_dice_focal_bwd_kernel, (B * n_sblk,),
               x, tgt, w if w is not None else coef, coef, fs, grad, C, S, n_sblk, int(ignore_index), g_hi, g_lo,
               HAS_W=w is not None, USE_FP64=use_fp64, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
    return grad
