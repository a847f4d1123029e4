"""What the Triton ops of more than one family share: op registration and the one path every launch
takes, host-side argument checks, and the device functions of the softmax (focal, Dice + focal) and of
the adapters' activations and dropout (pooled, pixel).

* ``triton_op(qualname)`` registers a host function as ``torch.library.triton_op(qualname)`` and keeps
  the plain function in ``HOST_FUNCTIONS`` (by op name), so that the host side can run on its own (on
  meta tensors, say) and show which kernels, grids and configurations it launches without launching
  anything: the sm_90 compile test in tests/test_triton_compile.py does exactly that.
* ``launch(kernel, grid, *args, **meta)`` is ``wrap_triton(kernel)[grid](*args, **meta)`` under a
  guard that makes the tensors' CUDA device current: Triton launches on the *current* device and its
  current stream, so without it tensors on ``cuda:1`` while device 0 is current would be read from
  the wrong device (an illegal address, or silently wrong results with peer access).
"""

import contextlib
import os
import struct
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op as _torch_triton_op
from torch.library import wrap_triton
from triton.language.extra import libdevice

__all__ = [
    "FLOAT_DTYPES", "HOST_FUNCTIONS", "INTERPRETED", "act_fwd_bwd", "check_activation", "check_adapter_params",
    "check_param", "check_scale",
    "device_guard", "dropout_args", "dropped", "launch", "log1p_01", "precise_softmax", "softmax_terms", "split_float",
    "triton_op",
]

# op name (without the namespace) -> the host function registered under it
HOST_FUNCTIONS: dict[str, Callable] = {}

# Kernels run under Triton's interpreter (numpy on CPU tensors): set before triton is imported, as
# triton.jit reads it when the kernels are defined.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_op(qualname: str):
    """Decorator: ``torch.library.triton_op(qualname, mutates_args=())``, the host function kept."""

    def register(fn: Callable):
        HOST_FUNCTIONS[qualname.split("::")[-1]] = fn
        return _torch_triton_op(qualname, mutates_args=())(fn)

    return register


def device_guard(device: torch.device):
    """A context that makes `device` the current CUDA device (nothing for CPU or meta tensors)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel, grid, *args, **meta) -> None:
    """Launches `kernel` on `grid` on the device of its tensor arguments (an op checks that they
    share one device before it launches)."""
    device = next(a.device for a in args if isinstance(a, Tensor))
    with device_guard(device):
        wrap_triton(kernel)[grid](*args, **meta)


# ----------------------------------------------------------------------------
# host-side arguments and checks
# ----------------------------------------------------------------------------

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# activation codes (fastcascade._ops.ADAPTER_ACTIVATION_CODES) and the uint32 mask of the dropout words
_RELU, _GELU, _SILU = 0, 1, 2
_M32 = 0xFFFFFFFF


def split_float(v: float, use_fp64: bool):
    """Split a Python float into an fp32 (hi, lo) pair so that hi + lo (computed in
    fp64 in the kernel) recovers ~48 mantissa bits; Triton passes float scalars as
    fp32. For fp32 compute the value is passed unchanged."""
    v = float(v)
    if not use_fp64:
        return v, 0.0
    try:
        hi = struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:
        return v, 0.0
    lo = v - hi
    if lo != lo or lo in (float("inf"), float("-inf")):
        lo = 0.0
    return hi, lo


def dropout_args(dropout: float, seed: int):
    if not 0 <= seed < 2**63:
        raise RuntimeError(f"seed must be in [0, 2**63), got {seed}")
    threshold = min(int(dropout * 4294967296.0), _M32)
    return seed & _M32, seed >> 32, threshold, 1.0 / (1.0 - dropout)


def check_activation(name: str, activation: int) -> None:
    if activation not in (_RELU, _GELU, _SILU):
        raise RuntimeError(f"{name}: activation must be 0 (relu), 1 (gelu) or 2 (silu), got {activation}")


def check_param(name: str, what: str, t: Tensor, shape, dev) -> None:
    if not t.dtype.is_floating_point:
        raise RuntimeError(f"{name}: {what} must be a float tensor, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise RuntimeError(f"{name}: {what} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != dev:
        raise RuntimeError(f"{name}: {what} is on {t.device}, expected {dev}")


def check_adapter_params(name: str, down_w: Tensor, down_b: Tensor, up_w: Tensor, up_b: Tensor,
                         scale: Tensor | None, C: int, R: int, dev) -> None:
    """The adapters' weights: down (R, C) + (R,), up (C, R) + (C,), scale one element or None, on dev."""
    check_param(name, "down_w", down_w, (R, C), dev)
    check_param(name, "down_b", down_b, (R,), dev)
    check_param(name, "up_w", up_w, (C, R), dev)
    check_param(name, "up_b", up_b, (C,), dev)
    check_scale(name, scale, dev)


def check_scale(name: str, scale: Tensor | None, dev) -> None:
    if scale is None:
        return
    if not scale.dtype.is_floating_point:
        raise RuntimeError(f"{name}: scale must be a float tensor, got {scale.dtype}")
    if scale.numel() != 1:
        raise RuntimeError(
            f"{name}: scale must be a 0-dim (one element) tensor, got shape {tuple(scale.shape)}")
    if scale.device != dev:
        raise RuntimeError(f"{name}: scale is on {scale.device}, expected {dev}")


# ----------------------------------------------------------------------------
# device functions: softmax terms (focal, Dice + focal)
# ----------------------------------------------------------------------------


_INTERPRETED = tl.constexpr(INTERPRETED)


@triton.jit
def _exp_rn(x):
    """exp(x) within an ulp or two over the whole range: libdevice's expf / exp (fp32 tl.exp is
    ex2.approx of a rounded x log2(e), off by up to ~|x| 2^-24 relative). The interpreter cannot call
    libdevice; its numpy exp is accurate already."""
    if _INTERPRETED:
        return tl.exp(x)
    else:
        return libdevice.exp(x)


@triton.jit
def _div(a, b, IEEE: tl.constexpr):
    """a / b, correctly rounded when IEEE (fp32 `/` compiles to div.full, ~2 ulp; fp64 `/` is IEEE)."""
    if IEEE:
        if b.dtype == tl.float32:
            return tl.math.div_rn(a, b)
        else:
            return a / b
    else:
        return a / b


@triton.jit
def log1p_01(e, IEEE: tl.constexpr = False):
    """Accurate log1p(e) for e >= 0 using only log (Goldberg/Kahan trick)."""
    u = 1.0 + e
    d = u - 1.0
    small = d == 0.0
    return tl.where(small, e, tl.log(u) * _div(e, tl.where(small, 1.0, d), IEEE))


@triton.jit
def precise_softmax(x, cols, cmask):
    """Softmax over the rows of x (rows, BLOCK_C; -inf in padded columns): (is_am, log p, p, 1 - p,
    1 / (1 + s)). log-sum-exp = mx + log1p(s), s summing exp(x - mx) over c != argmax: the arg-max term
    (exactly 1) stays out of the sum, so log p and 1 - p of a confident class keep their relative
    precision; only the arg-max class can have p > 1/2, and its 1 - p is s / (1 + s). exp is
    libdevice's expf (within 2 ulp over the whole range) and the divisions are IEEE-rounded (div.rn),
    as in the C++ kernels."""
    mx, am = tl.max(x, axis=1, return_indices=True, return_indices_tie_break_left=True)
    is_am = cols[None, :] == am[:, None]
    # x - mx is 0 where x == mx, also for x = mx = +-inf (inf - inf is NaN); padded columns stay -inf
    xm = tl.where(cmask[None, :], tl.where(x == mx[:, None], 0.0, x - mx[:, None]), float("-inf"))
    ex = _exp_rn(xm)
    s = tl.sum(tl.where(is_am, 0.0, ex), axis=1)
    inv = _div(1.0, 1.0 + s, True)
    lp = xm - log1p_01(s, True)[:, None]
    p = tl.where(is_am, inv[:, None], ex * inv[:, None])
    om = tl.where(is_am, (s * inv)[:, None], 1.0 - p)
    return is_am, lp, p, om, inv


@triton.jit
def softmax_terms(lp, p, om, is_t, w, eps_c, one_m_eps, gamma, NEED_GRAD: tl.constexpr):
    """Per (row, class) terms of the softmax focal loss, given log p, p and 1 - p.

    Returns (loss contribution, a_c); grad_c = a_c - p_c * sum_c a_c.
    """
    om_pos = om > 0.0
    omg = tl.where(om_pos, tl.exp(gamma * tl.log(tl.where(om_pos, om, 1.0))),
                   tl.where(gamma == 0.0, 1.0, 0.0))
    q = eps_c + tl.where(is_t, one_m_eps, 0.0)
    coef = w * q * omg
    # products whose (non-negative) coefficient is 0 are 0 even where lp == -inf
    loss_c = coef * tl.where(coef == 0.0, 0.0, -lp)
    if NEED_GRAD:
        u = tl.where(om_pos, p * tl.where(p == 0.0, 0.0, lp) / tl.where(om_pos, om, 1.0), -1.0)
        a = coef * (gamma * u - 1.0)
    else:
        a = loss_c
    return loss_c, a


# ----------------------------------------------------------------------------
# device functions: adapter activations and dropout (pooled, pixel)
# ----------------------------------------------------------------------------


@triton.jit
def act_fwd_bwd(h, ACT: tl.constexpr, WIDE: tl.constexpr):
    """(act(h), act'(h)), evaluated in fp64 when WIDE (as the pooled adapter's _act_fwd), else in h's dtype."""
    if WIDE:
        hd = h.to(tl.float64)
    else:
        hd = h
    if ACT == 0:
        nonpos = hd <= 0.0  # False for NaN: torch.relu keeps NaN and its backward passes the gradient
        a = tl.where(nonpos, 0.0, hd)
        d = tl.where(nonpos, 0.0, 1.0).to(tl.float64)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(hd * 0.7071067811865476))
        a = hd * cdf
        d = cdf + hd * (0.3989422804014327 * tl.exp(-0.5 * hd * hd))
    else:
        sig = 1.0 / (1.0 + tl.exp(-hd))
        a = hd * sig
        d = sig * (1.0 + hd * (1.0 - sig))
    return a.to(h.dtype), d.to(h.dtype)


@triton.jit
def _mix32(v):
    # lowbias32, as fc_mix32 in csrc/common/adapter_math.h (uint32 arithmetic wraps mod 2^32)
    v = v ^ (v >> 16)
    v = v * 0x7FEB352D
    v = v ^ (v >> 15)
    v = v * tl.full((), 0x846CA68B, tl.uint32)
    return v ^ (v >> 16)


@triton.jit
def _dropout_keep(index, seed_lo, seed_hi, threshold):
    # tl.cast, not .to: compiled Triton passes an integer argument equal to 1 as a Python constant
    lo = (index & 0xFFFFFFFF).to(tl.uint32)
    hi = (index >> 32).to(tl.uint32)
    inner = _mix32(hi + tl.cast(seed_hi, tl.uint32))
    h = _mix32(lo ^ _mix32(tl.cast(seed_lo, tl.uint32) ^ inner))
    return h >= tl.cast(threshold, tl.uint32)


@triton.jit
def dropped(v, index, seed_lo, seed_hi, threshold, keep_scale, HAS_DROPOUT: tl.constexpr):
    """Dropout of the hidden activations v at element indices `index` (int64): v / (1 - p) where kept."""
    if HAS_DROPOUT:
        v = tl.where(_dropout_keep(index, seed_lo, seed_hi, threshold), v * keep_scale, 0.0)
    return v
