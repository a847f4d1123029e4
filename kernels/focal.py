"""Triton kernels for sigmoid and softmax focal losses (forward + fused gradient).

Two custom ops are defined with ``torch.library.triton_op`` in the
``fastcascade`` namespace:

* ``fastcascade::sigmoid_focal_triton``
* ``fastcascade::softmax_focal_triton``

Both return ``(loss, grad_logits, grad_scale)`` where ``grad_logits`` is
d(sum of per-element/per-row losses)/d(logits) (empty when ``need_grad`` is
False) and ``grad_scale`` is the 0-dim factor (float64 for float64 logits, else
float32) that turns it into the
gradient of the reduced loss (1/numel or 1/sum-of-weights for "mean", 1
otherwise).

Reductions are two-stage and deterministic: every program writes one partial
(fp32, or fp64 for fp64 inputs) for a fixed-size block whose size depends only
on the input shape, then the partials buffer is summed with ``torch.sum``.
No atomics are used.

Accuracy on a GPU (fp32 compute; fp64 is IEEE throughout): compiled Triton turns fp32 ``tl.exp``
into ``ex2.approx`` of x log2(e) (relative error ~2 ulp + |x| 2^-24) and ``/`` into ``div.full``
(~2 ulp); ``tl.log`` is libdevice's ``logf``. The softmax of the tile kernels (precise_softmax,
also Dice + focal's) uses libdevice's ``expf`` (within 2 ulp) and IEEE-rounded division instead, as
the C++ kernels do, so its probabilities match theirs to an ulp or two; the focal factor (1 - p)^gamma, the sigmoid
kernel and the chunked (C > 4096) softmax use the fast forms, a few ulp per operation, which the
tolerance model (2x the fp32 reference's own error) absorbs. The interpreter (TRITON_INTERPRET=1)
runs numpy's correctly rounded functions everywhere.

Fake kernels and autograd are registered elsewhere (fastcascade/_ops/focal.py).
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import FLOAT_DTYPES, launch, log1p_01, precise_softmax, softmax_terms, split_float, triton_op

__all__ = ["sigmoid_focal_triton", "softmax_focal_triton"]

# reduction codes
_NONE, _MEAN, _SUM = 0, 1, 2

# sigmoid: elements per program (fixed, so the partials layout only depends on numel)
_SIG_BLOCK = 2048
_SIG_WARPS = 8

# softmax: target number of elements per (rows x classes) register tile (whole rows are
# kept in registers, so tiles are BLOCK_R x next_pow2(C) and can exceed this); classes
# beyond _MAX_TILE_C are processed by the chunked (looping, 3-pass) kernel with
# chunks of _CHUNK_C classes.
_TILE_ELEMS = 2048
_MAX_TILE_C = 4096
_CHUNK_C = 1024

_SIG_TARGET_DTYPES = FLOAT_DTYPES + (torch.bool, torch.uint8)


# ----------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------


@triton.jit
def _neg_expm1(lp):
    """Returns (exp(lp), -expm1(lp)) for lp <= 0, the latter accurate near 0 (Kahan trick)."""
    u = tl.exp(lp)
    d = u - 1.0
    is_one = d == 0.0
    is_zero = d == -1.0
    safe_u = tl.where(is_one | is_zero, 0.5, u)
    om = tl.where(is_one, -lp, tl.where(is_zero, 1.0, -d * (lp / tl.log(safe_u))))
    return u, om


# ----------------------------------------------------------------------------
# sigmoid focal loss
# ----------------------------------------------------------------------------


@triton.jit
def _sigmoid_focal_kernel(
    x_ptr, t_ptr, loss_ptr, grad_ptr, part_ptr, n,
    alpha_hi, alpha_lo, gamma_hi, gamma_lo, eps_hi, eps_lo,
    REDUCE: tl.constexpr, NEED_GRAD: tl.constexpr, USE_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    CT: tl.constexpr = tl.float64 if USE_FP64 else tl.float32
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n

    alpha = tl.cast(alpha_hi, CT) + tl.cast(alpha_lo, CT)
    gamma = tl.cast(gamma_hi, CT) + tl.cast(gamma_lo, CT)
    eps = tl.cast(eps_hi, CT) + tl.cast(eps_lo, CT)

    x = tl.load(x_ptr + offs, mask=mask, other=0).to(CT)
    t_raw = tl.load(t_ptr + offs, mask=mask, other=0).to(CT)
    bad = ~((t_raw >= 0.0) & (t_raw <= 1.0))  # invalid input (NaN too): NaN loss and gradient
    t = t_raw * (1.0 - eps) + eps * 0.5
    omt = 1.0 - t

    e = tl.exp(-tl.abs(x))
    r1 = 1.0 / (1.0 + e)
    r0 = e * r1
    pos = x >= 0.0
    p = tl.where(pos, r1, r0)
    q = tl.where(pos, r0, r1)
    l1pe = log1p_01(e)
    sp_pos = tl.maximum(x, 0.0) + l1pe  # softplus(x)  = -log(q)
    sp_neg = tl.maximum(-x, 0.0) + l1pe  # softplus(-x) = -log(p)
    # a product whose coefficient is 0 is 0 even where the softplus is +inf
    ce = omt * tl.where(omt == 0.0, 0.0, sp_pos) + t * tl.where(t == 0.0, 0.0, sp_neg)

    m = p * omt + q * t  # 1 - p_t
    m_pos = m > 0.0
    m_safe = tl.where(m_pos, m, 1.0)
    mg = tl.where(m_pos, tl.exp(gamma * tl.log(m_safe)), tl.where(gamma == 0.0, 1.0, 0.0))
    at = tl.where(alpha >= 0.0, alpha * t + (1.0 - alpha) * omt, 1.0)
    atmg = at * mg
    loss = tl.where(bad, float("nan"), atmg * ce)

    if REDUCE == 0:
        tl.store(loss_ptr + offs, loss.to(loss_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + pid, tl.sum(tl.where(mask, loss, 0.0), axis=0))

    if NEED_GRAD:
        r = tl.where(m_pos, p * q / m_safe, tl.where(t > 0.5, p, q))
        cr = r * tl.where(r == 0.0, 0.0, ce)
        g = tl.where(bad, float("nan"), atmg * ((p - t) + gamma * cr * (1.0 - 2.0 * t)))
        tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------
# softmax focal loss
# ----------------------------------------------------------------------------


@triton.jit
def _softmax_rows(pid, n_rows, C, S, n_sblk, SPATIAL: tl.constexpr, BLOCK_R: tl.constexpr):
    """Row indices (int64), row mask and the element offset of class 0 of each row;
    element (row, c) sits at base + c * cstride."""
    if SPATIAL:
        o = pid // n_sblk
        sb = pid - o * n_sblk
        s = sb.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = s < S
        o64 = o.to(tl.int64)
        rows = o64 * S + s
        base = o64 * C * S + s
    else:
        rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < n_rows
        base = rows * C
    return rows, rmask, base


@triton.jit
def _softmax_finish_rows(
    pid, rows, rmask, valid, ign, loss_row, wt, loss_ptr, lpart_ptr, dpart_ptr,
    REDUCE: tl.constexpr,
):
    loss_r = tl.where(ign, 0.0, tl.where(valid, loss_row, float("nan")))
    if REDUCE == 0:
        tl.store(loss_ptr + rows, loss_r.to(loss_ptr.dtype.element_ty), mask=rmask)
    else:
        tl.store(lpart_ptr + pid, tl.sum(tl.where(rmask, loss_r, 0.0), axis=0))
        if REDUCE == 1:
            den_r = tl.where(ign, 0.0, tl.where(valid, wt, float("nan")))
            tl.store(dpart_ptr + pid, tl.sum(tl.where(rmask, den_r, 0.0), axis=0))


@triton.jit
def _prob_valid(row_sum, row_min, tol):
    """Whether rows of class probabilities are distributions: entries >= 0, the sum within tol of 1 (a
    NaN entry makes the sum NaN, which fails)."""
    return (row_min >= 0.0) & (tl.abs(row_sum - 1.0) <= tol)


@triton.jit
def _softmax_focal_tile_kernel(
    x_ptr, t_ptr, w_ptr, loss_ptr, grad_ptr, lpart_ptr, dpart_ptr,
    n_rows, C, S, n_sblk, ignore_index,
    gamma_hi, gamma_lo, eps_hi, eps_lo, tol,
    HAS_W: tl.constexpr, REDUCE: tl.constexpr, NEED_GRAD: tl.constexpr,
    USE_FP64: tl.constexpr, SPATIAL: tl.constexpr, PROBS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Whole rows (all classes) of BLOCK_R rows in one register tile. PROBS: t_ptr holds class
    probabilities in the logits' layout instead of class indices."""
    CT: tl.constexpr = tl.float64 if USE_FP64 else tl.float32
    pid = tl.program_id(0)
    gamma = tl.cast(gamma_hi, CT) + tl.cast(gamma_lo, CT)
    eps = tl.cast(eps_hi, CT) + tl.cast(eps_lo, CT)
    eps_c = eps / C
    one_m_eps = 1.0 - eps

    rows, rmask, base = _softmax_rows(pid, n_rows, C, S, n_sblk, SPATIAL, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    if SPATIAL:
        offs = base[:, None] + cols.to(tl.int64)[None, :] * S
    else:
        offs = base[:, None] + cols[None, :]
    mask2 = rmask[:, None] & cmask[None, :]

    x = tl.load(x_ptr + offs, mask=mask2, other=0).to(CT)
    x = tl.where(cmask[None, :], x, float("-inf"))
    is_am, lp, p, om, inv = precise_softmax(x, cols, cmask)

    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=0).to(CT)
    else:
        w = tl.where(cmask, 1.0, 0.0).to(CT)
    if PROBS:
        r = tl.load(t_ptr + offs, mask=mask2, other=0).to(CT)
        valid = _prob_valid(tl.sum(r, axis=1), tl.min(r, axis=1), tol)  # padded columns hold 0
        ign = rows < 0  # none: ignore_index does not apply to probabilities
        wt = tl.full([BLOCK_R], 1.0, CT)  # "mean" over probabilities divides by the number of rows
        # softmax_terms forms q = eps_c + [is_t] (1 - eps): with no is_t, the tile (1 - eps) r + eps / C
        # in place of eps_c is q itself
        loss_c, a = softmax_terms(lp, p, om, cols[None, :] < 0, w[None, :], r * one_m_eps + eps_c, one_m_eps,
                                  gamma, NEED_GRAD)
    else:
        t = tl.load(t_ptr + rows, mask=rmask, other=0)
        ign = t == ignore_index
        valid = (t >= 0) & (t < C)
        if HAS_W:
            wt = tl.load(w_ptr + tl.where(valid, t, 0), mask=rmask & valid, other=0).to(CT)
        else:
            wt = tl.full([BLOCK_R], 1.0, CT)
        is_t = cols[None, :] == t[:, None]
        loss_c, a = softmax_terms(lp, p, om, is_t, w[None, :], eps_c, one_m_eps, gamma, NEED_GRAD)
    loss_row = tl.sum(loss_c, axis=1)
    _softmax_finish_rows(pid, rows, rmask, valid, ign, loss_row, wt, loss_ptr,
                         lpart_ptr, dpart_ptr, REDUCE)
    if NEED_GRAD:
        # grad = a - p A cancels for the arg-max class as p -> 1: form it as a_am (1 - p) - p rest
        a_am = tl.sum(tl.where(is_am, a, 0.0), axis=1)
        rest = tl.sum(tl.where(is_am, 0.0, a), axis=1)
        g = tl.where(is_am, a * om - p * rest[:, None], a - p * (a_am + rest)[:, None])
        g = tl.where(ign[:, None], 0.0, tl.where(valid[:, None], g, float("nan")))
        tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask2)


@triton.jit
def _chunk_terms(t_ptr, offs, mask2, t, cols, lp, p, om, w, eps_c, one_m_eps, gamma, CT: tl.constexpr,
                 NEED_GRAD: tl.constexpr, PROBS: tl.constexpr):
    """softmax_terms of one class chunk, with class indices t or (PROBS) the probabilities at t_ptr + offs."""
    if PROBS:
        r = tl.load(t_ptr + offs, mask=mask2, other=0).to(CT)
        # q = eps_c + [is_t] (1 - eps) in softmax_terms: with no is_t, the tile of q in place of eps_c
        return softmax_terms(lp, p, om, cols[None, :] < 0, w[None, :], r * one_m_eps + eps_c, one_m_eps, gamma,
                             NEED_GRAD)
    else:
        return softmax_terms(lp, p, om, cols[None, :] == t[:, None], w[None, :], eps_c, one_m_eps, gamma,
                             NEED_GRAD)


@triton.jit
def _softmax_focal_chunk_kernel(
    x_ptr, t_ptr, w_ptr, loss_ptr, grad_ptr, lpart_ptr, dpart_ptr,
    n_rows, C, S, n_sblk, ignore_index,
    gamma_hi, gamma_lo, eps_hi, eps_lo, tol,
    HAS_W: tl.constexpr, REDUCE: tl.constexpr, NEED_GRAD: tl.constexpr,
    USE_FP64: tl.constexpr, SPATIAL: tl.constexpr, PROBS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Large C: loop over class chunks (online logsumexp, then loss/A, then grad). PROBS: t_ptr holds
    class probabilities in the logits' layout (their row check rides along pass 1)."""
    CT: tl.constexpr = tl.float64 if USE_FP64 else tl.float32
    pid = tl.program_id(0)
    gamma = tl.cast(gamma_hi, CT) + tl.cast(gamma_lo, CT)
    eps = tl.cast(eps_hi, CT) + tl.cast(eps_lo, CT)
    eps_c = eps / C
    one_m_eps = 1.0 - eps

    rows, rmask, base = _softmax_rows(pid, n_rows, C, S, n_sblk, SPATIAL, BLOCK_R)
    if PROBS:
        t = rows  # unused: no class indices
        ign = rows < 0  # none: ignore_index does not apply to probabilities
        wt = tl.full([BLOCK_R], 1.0, CT)  # "mean" over probabilities divides by the number of rows
    else:
        t = tl.load(t_ptr + rows, mask=rmask, other=0)
        ign = t == ignore_index
        valid = (t >= 0) & (t < C)
        if HAS_W:
            wt = tl.load(w_ptr + tl.where(valid, t, 0), mask=rmask & valid, other=0).to(CT)
        else:
            wt = tl.full([BLOCK_R], 1.0, CT)

    # pass 1: online max / sum-exp (and the probability rows' sum and minimum)
    m_run = tl.full([BLOCK_R], float("-inf"), CT)
    s_run = tl.zeros([BLOCK_R], CT)
    r_sum = tl.zeros([BLOCK_R], CT)
    r_min = tl.zeros([BLOCK_R], CT)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        if SPATIAL:
            offs = base[:, None] + cols.to(tl.int64)[None, :] * S
        else:
            offs = base[:, None] + cols[None, :]
        if PROBS:
            r = tl.load(t_ptr + offs, mask=rmask[:, None] & cmask[None, :], other=0).to(CT)
            r_sum += tl.sum(r, axis=1)
            r_min = tl.minimum(r_min, tl.min(r, axis=1))
        x = tl.load(x_ptr + offs, mask=rmask[:, None] & cmask[None, :], other=0).to(CT)
        x = tl.where(cmask[None, :], x, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(x, axis=1))
        scale = tl.where(m_run == m_new, 1.0, tl.exp(m_run - m_new))
        # x == max gives exp(0) = 1 also when both are +inf (inf - inf would be NaN)
        ex = tl.where(x == float("-inf"), 0.0, tl.where(x == m_new[:, None], 1.0, tl.exp(x - m_new[:, None])))
        s_run = s_run * scale + tl.sum(ex, axis=1)
        m_run = m_new
    lse = tl.log(s_run)
    if PROBS:
        valid = _prob_valid(r_sum, r_min, tol)

    # pass 2: loss and A = sum_c a_c
    loss_row = tl.zeros([BLOCK_R], CT)
    A = tl.zeros([BLOCK_R], CT)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        if SPATIAL:
            offs = base[:, None] + cols.to(tl.int64)[None, :] * S
        else:
            offs = base[:, None] + cols[None, :]
        x = tl.load(x_ptr + offs, mask=rmask[:, None] & cmask[None, :], other=0).to(CT)
        x = tl.where(cmask[None, :], x, float("-inf"))
        lp = tl.where(x == m_run[:, None], 0.0, x - m_run[:, None]) - lse[:, None]
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=cmask, other=0).to(CT)
        else:
            w = tl.where(cmask, 1.0, 0.0).to(CT)
        p, om = _neg_expm1(lp)
        loss_c, a = _chunk_terms(t_ptr, offs, rmask[:, None] & cmask[None, :], t, cols, lp, p, om, w, eps_c,
                                 one_m_eps, gamma, CT, NEED_GRAD, PROBS)
        loss_row += tl.sum(loss_c, axis=1)
        if NEED_GRAD:
            A += tl.sum(a, axis=1)

    _softmax_finish_rows(pid, rows, rmask, valid, ign, loss_row, wt, loss_ptr,
                         lpart_ptr, dpart_ptr, REDUCE)

    # pass 3: gradient
    if NEED_GRAD:
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cmask = cols < C
            if SPATIAL:
                offs = base[:, None] + cols.to(tl.int64)[None, :] * S
            else:
                offs = base[:, None] + cols[None, :]
            mask2 = rmask[:, None] & cmask[None, :]
            x = tl.load(x_ptr + offs, mask=mask2, other=0).to(CT)
            x = tl.where(cmask[None, :], x, float("-inf"))
            lp = tl.where(x == m_run[:, None], 0.0, x - m_run[:, None]) - lse[:, None]
            if HAS_W:
                w = tl.load(w_ptr + cols, mask=cmask, other=0).to(CT)
            else:
                w = tl.where(cmask, 1.0, 0.0).to(CT)
            p, om = _neg_expm1(lp)
            loss_c, a = _chunk_terms(t_ptr, offs, mask2, t, cols, lp, p, om, w, eps_c, one_m_eps, gamma, CT,
                                     NEED_GRAD, PROBS)
            g = a - p * A[:, None]
            g = tl.where(ign[:, None], 0.0, tl.where(valid[:, None], g, float("nan")))
            tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask2)


# ----------------------------------------------------------------------------
# host helpers
# ----------------------------------------------------------------------------


def _is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the elements fill exactly numel consecutive slots."""
    if t.numel() <= 1:
        return True
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


def _same_layout(a: Tensor, b: Tensor) -> bool:
    if a.numel() <= 1:
        return True
    return all(sa == sb for sz, sa, sb in zip(a.shape, a.stride(), b.stride()) if sz != 1)


def _sigmoid_config(n: int):
    """(grid, BLOCK, num_warps) of the sigmoid kernel for n elements: fixed blocks, so the partials
    layout (and the sum's order) depends only on n."""
    return (triton.cdiv(n, _SIG_BLOCK),), _SIG_BLOCK, _SIG_WARPS


def _softmax_config(N: int, C: int, S: int):
    """(kernel, grid, n_sblk, BLOCK_R, BLOCK_C, num_warps) of softmax focal over logits (N, C, S)
    (S = 1 for (N, C)): whole rows in one register tile up to _MAX_TILE_C classes, class chunks beyond."""
    if C <= _MAX_TILE_C:
        kernel = _softmax_focal_tile_kernel
        block_c = triton.next_power_of_2(C)
    else:
        kernel = _softmax_focal_chunk_kernel
        block_c = _CHUNK_C
    block_r = max(1, _TILE_ELEMS // block_c)
    # do not make tiles taller than the row dimension they walk over
    spatial = S > 1
    block_r = min(block_r, triton.next_power_of_2(max(S if spatial else N * S, 1)))
    if spatial:
        n_sblk = triton.cdiv(S, block_r)
        grid = (N * n_sblk,)
    else:
        n_sblk = 1
        grid = (triton.cdiv(N * S, block_r),)
    # ~8 tile elements per thread
    num_warps = min(16, max(4, (block_r * block_c) // 256))
    return kernel, grid, n_sblk, block_r, block_c, num_warps


def _check_reduction(reduction: int) -> None:
    if reduction not in (_NONE, _MEAN, _SUM):
        raise RuntimeError(f"fastcascade: reduction must be 0 (none), 1 (mean) or 2 (sum), got {reduction}")


# ----------------------------------------------------------------------------
# ops
# ----------------------------------------------------------------------------


@triton_op("fastcascade::sigmoid_focal_triton")
def sigmoid_focal_triton(
    logits: Tensor,
    targets: Tensor,
    alpha: float,
    gamma: float,
    label_smoothing: float,
    reduction: int,
    need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_reduction(reduction)
    if logits.dtype not in FLOAT_DTYPES:
        raise RuntimeError(f"sigmoid_focal_triton: logits must be float16/bfloat16/float32/float64, got {logits.dtype}")
    if targets.dtype not in _SIG_TARGET_DTYPES:
        raise RuntimeError(
            f"sigmoid_focal_triton: targets must be float16/bfloat16/float32/float64/bool/uint8, got {targets.dtype}")
    if targets.device != logits.device:
        raise RuntimeError(
            f"sigmoid_focal_triton: logits ({logits.device}) and targets ({targets.device}) must be on the same device")
    if targets.shape != logits.shape:
        raise RuntimeError(
            f"sigmoid_focal_triton: targets shape {tuple(targets.shape)} != logits shape {tuple(logits.shape)}")
    if not (_is_dense(logits) and _same_layout(logits, targets)):
        raise RuntimeError(
            "sigmoid_focal_triton: logits and targets must be non-overlapping and dense with identical strides "
            f"(got strides {tuple(logits.stride())} and {tuple(targets.stride())})")

    n = logits.numel()
    use_fp64 = logits.dtype == torch.float64
    acc_dtype = torch.float64 if use_fp64 else torch.float32
    dev = logits.device
    grid, block, num_warps = _sigmoid_config(n)

    if reduction == _NONE:
        loss = torch.empty_like(logits)
        partials = loss  # unused by the kernel
    else:
        partials = torch.empty(grid[0], dtype=acc_dtype, device=dev)
        loss = partials  # unused by the kernel
    if need_grad:
        grad = torch.empty_like(logits)
    else:
        grad = torch.empty(0, dtype=logits.dtype, device=dev)

    a_hi, a_lo = split_float(alpha, use_fp64)
    g_hi, g_lo = split_float(gamma, use_fp64)
    e_hi, e_lo = split_float(label_smoothing, use_fp64)
    if n > 0:
        launch(_sigmoid_focal_kernel, grid,
               logits, targets, loss, grad, partials, n,
               a_hi, a_lo, g_hi, g_lo, e_hi, e_lo,
               REDUCE=reduction, NEED_GRAD=bool(need_grad), USE_FP64=use_fp64,
               BLOCK=block, num_warps=num_warps)

    if reduction == _NONE:
        out = loss
        scale = torch.ones((), dtype=acc_dtype, device=dev)
    else:
        total = torch.sum(partials)
        if reduction == _MEAN:
            out = (total / n).to(logits.dtype)
            scale = torch.full((), (1.0 / n) if n > 0 else float("nan"), dtype=acc_dtype, device=dev)
        else:
            out = total.to(logits.dtype)
            scale = torch.ones((), dtype=acc_dtype, device=dev)
    return out, grad, scale


@triton_op("fastcascade::softmax_focal_triton")
def softmax_focal_triton(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    gamma: float,
    label_smoothing: float,
    ignore_index: int,
    reduction: int,
    need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_reduction(reduction)
    if logits.dtype not in FLOAT_DTYPES:
        raise RuntimeError(f"softmax_focal_triton: logits must be float16/bfloat16/float32/float64, got {logits.dtype}")
    if logits.dim() not in (2, 3):
        raise RuntimeError(f"softmax_focal_triton: logits must be (N, C) or (N, C, S), got shape {tuple(logits.shape)}")
    N, C = logits.shape[0], logits.shape[1]
    S = logits.shape[2] if logits.dim() == 3 else 1
    if C < 1:
        raise RuntimeError("softmax_focal_triton: number of classes C must be >= 1")
    probs = target.dtype in FLOAT_DTYPES  # class probabilities of the logits' shape, as F.cross_entropy
    expected_t = tuple(logits.shape) if probs else ((N, S) if logits.dim() == 3 else (N,))
    if tuple(target.shape) != expected_t:
        raise RuntimeError(
            f"softmax_focal_triton: target shape {tuple(target.shape)} does not match logits shape "
            f"{tuple(logits.shape)} (expected {expected_t})")
    if not probs and (target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool):
        raise RuntimeError(f"softmax_focal_triton: target must be int64 class indices or float class probabilities, "
                           f"got {target.dtype}")
    if target.device != logits.device:
        raise RuntimeError("softmax_focal_triton: logits and target must be on the same device")

    use_fp64 = logits.dtype == torch.float64
    acc_dtype = torch.float64 if use_fp64 else torch.float32
    dev = logits.device
    x = logits.contiguous()
    tgt = target.contiguous()

    has_w = weight is not None
    if weight is not None:
        if tuple(weight.shape) != (C,):
            raise RuntimeError(f"softmax_focal_triton: weight must have shape ({C},), got {tuple(weight.shape)}")
        if not weight.dtype.is_floating_point:
            raise RuntimeError(f"softmax_focal_triton: weight must be a float tensor, got {weight.dtype}")
        w = weight.to(device=dev, dtype=acc_dtype).contiguous()
    else:
        w = torch.empty(1, dtype=acc_dtype, device=dev)  # unused by the kernel

    n_rows = N * S
    spatial = S > 1
    kernel, grid, n_sblk, block_r, block_c, num_warps = _softmax_config(N, C, S)

    # as fastcascade.reference.probability_tolerance
    tol = (1e-2 if target.dtype in (torch.float16, torch.bfloat16) else 1e-3) if probs else 0.0
    if reduction == _NONE:
        loss = torch.empty((N, S) if logits.dim() == 3 else (N,), dtype=logits.dtype, device=dev)
        lpart = loss  # unused
        dpart = loss  # unused
    else:
        lpart = torch.empty(grid[0], dtype=acc_dtype, device=dev)
        dpart = torch.empty(grid[0], dtype=acc_dtype, device=dev) if reduction == _MEAN else lpart
        loss = lpart  # unused
    if need_grad:
        grad = torch.empty(tuple(logits.shape), dtype=logits.dtype, device=dev)
    else:
        grad = torch.empty(0, dtype=logits.dtype, device=dev)

    g_hi, g_lo = split_float(gamma, use_fp64)
    e_hi, e_lo = split_float(label_smoothing, use_fp64)
    if grid[0] > 0:
        launch(kernel, grid,
               x, tgt, w, loss, grad, lpart, dpart,
               n_rows, C, S, n_sblk, -100 if probs else int(ignore_index),
               g_hi, g_lo, e_hi, e_lo, tol,
               HAS_W=has_w, REDUCE=reduction, NEED_GRAD=bool(need_grad),
               USE_FP64=use_fp64, SPATIAL=spatial, PROBS=probs,
               BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)

    if reduction == _NONE:
        out = loss
        scale = torch.ones((), dtype=acc_dtype, device=dev)
    elif reduction == _SUM:
        out = torch.sum(lpart).to(logits.dtype)
        scale = torch.ones((), dtype=acc_dtype, device=dev)
    else:
        total = torch.sum(lpart)
        den = torch.sum(dpart)
        out = (total / den).to(logits.dtype)
        # as torch: "mean" over only ignored rows (or over no rows) is NaN with a zero gradient
        scale = torch.where(den != 0, 1.0 / den, torch.zeros_like(den))  # acc_dtype already
    return out, grad, scale
