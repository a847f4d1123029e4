"""Case table of the focal family (sigmoid_focal, softmax_focal): the shapes and edge values the tests,
the self-test and the sm_90 compile gate draw."""

from __future__ import annotations

import math

import torch

from ... import reference
from .common import I32, Case, GateCase, Meta, Shape, in_tiers, public_api, randint, randn

f16, bf16, f32, f64, i64 = torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64

DTYPES = (f32, bf16, f16)  # the tests' dtypes for both losses
REDUCTIONS = ("none", "mean", "sum")

# kw of a self-test row: alpha, gamma, reduction, eps (label smoothing), weighted, ignore; the strided row's
# logits are every other column of a (7, 130) tensor
SIGMOID = (
    Shape((64, 37), "small", test=False),
    Shape((1,), "awkward", kw=dict(alpha=0.6, gamma=5.0, reduction="sum")),
    Shape((7,)),
    Shape((4097,), "awkward", kw=dict(alpha=None, gamma=0.5, reduction="none", eps=0.1)),
    Shape((3, 5, 33)),
    Shape((7, 65), "awkward", test=False, layout="strided", kw=dict(reduction="sum")),
    Shape((1 << 24,), "bench", test=False),
)
SOFTMAX = (  # (N, C) or (N, C, d1, ...)
    Shape((1, 3), "awkward", kw=dict(reduction="sum")),
    Shape((7, 1)),
    Shape((33, 10), "small", kw=dict(weighted=True)),
    Shape((5, 17)),
    Shape((2, 4, 3, 5), "awkward"),
    Shape((4097, 3), "awkward", test=False, kw=dict(gamma=0.5, weighted=True, ignore=1, eps=0.05, reduction="none")),
    Shape((2, 5, 7, 9), "awkward", test=False, layout="channels_last"),
    Shape((1 << 22, 10), "bench", test=False),
)

EMPTY = (0, 3)  # no rows of 3 classes: "sum" is 0 and "mean" NaN, as in torch

# saturated and infinite logits: with matching hard targets the loss and gradient are ~0, never NaN
SIGMOID_SATURATED = (1e4, -1e4, 80.0, -80.0, 30.0, -30.0, math.inf, -math.inf, 17.0, -17.0)
SOFTMAX_SATURATED = (((1e4, -1e4, 0.0), 0), ((-1e4, 1e4, 5.0), 1), ((60.0, -60.0, -60.0), 0),
                     ((0.0, -math.inf, 30.0), 2))  # (row, target)


# ---------------------------------------------------------------------------------------------
# self-test

# The tolerance model (reference_errors) measures the reference's rounding error with every float input
# nudged by a few units of the dtype's precision, targets included: a hard target of 1 becomes 1 + 4 eps and
# a row of bfloat16 probabilities may sum to 1 +- 3%, both invalid input (NaN). The references project
# them back; on the targets the cases draw (valid ones) the projections are the identity, up to rounding.


def _valid_targets(t):
    return t.clamp(0, 1) if t.is_floating_point() else t


def _valid_probabilities(r):
    r = r.clamp(min=0)
    return r / r.sum(1, keepdim=True)



def _sigmoid_case(row, dtype):
    alpha, gamma = row.get("alpha", 0.25), row.get("gamma", 2.0)
    reduction, eps = row.get("reduction", "mean"), row.get("eps", 0.0)
    strided = row.layout == "strided"
    base = (row.shape[0], 2 * row.shape[1]) if strided else row.shape
    view = (lambda x: x[:, ::2]) if strided else None

    def make(gen, device):
        x = randn(gen, device, base, dtype, 3.0)
        t_shape = x.shape if view is None else view(x).shape
        t = (torch.rand(t_shape, generator=gen, device=device) > 0.7).to(torch.float32)
        return [x, t]

    label = f"{row.label}{' strided' if strided else ''} {reduction}"
    return Case("sigmoid_focal", row.tier, label, dtype, make,
                lambda b, x, t: public_api().sigmoid_focal_loss(x, t, alpha, gamma, reduction, eps, backend=b),
                lambda x, t: reference.sigmoid_focal_loss(x, _valid_targets(t), alpha, gamma, reduction, eps),
                ("logits", "targets"), ("loss",), diff=(0,), views={0: view} if view else {})


def _softmax_case(row, dtype, probs=False):
    """probs: class-probability targets of the logits' shape (float32) instead of class indices."""
    shape, C = row.shape, row.shape[1]
    gamma, weighted, ignore = row.get("gamma", 2.0), row.get("weighted", False), row.get("ignore", -100)
    eps, reduction = row.get("eps", 0.0), row.get("reduction", "mean")
    channels_last = row.layout == "channels_last"
    t_shape = (shape[0],) + tuple(shape[2:])

    def make(gen, device):
        x = randn(gen, device, shape, dtype, 3.0)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if probs:
            t = torch.softmax(randn(gen, device, shape, torch.float32, 2.0), 1)
        else:
            t = randint(gen, device, C, t_shape)
            t.view(-1)[0] = (ignore + 1) % C  # at least one counted row ("mean" over none is NaN)
        w = torch.rand(C, generator=gen, device=device) + 0.5 if weighted else None
        return [x, t] + ([w] if weighted else [])

    def split(args):
        return args[0], args[1], (args[2] if weighted else None)

    def public(b, *args):
        x, t, w = split(args)
        return public_api().softmax_focal_loss(x, t, gamma, w, ignore, eps, reduction, backend=b)

    def ref(*args):
        x, t, w = split(args)
        return reference.softmax_focal_loss(x, _valid_probabilities(t) if probs else t, gamma, w, ignore, eps,
                                            reduction)

    label = row.label + (" nhwc" if channels_last else "") + (" probabilities" if probs else "") + f" {reduction}"
    return Case("softmax_focal", row.tier, label, dtype, make, public, ref,
                ("logits", "target") + (("weight",) if weighted else ()), ("loss",), diff=(0,))


def selftest_cases(dtypes, tiers, quick=False) -> list:
    out = []
    for d in dtypes:
        out += [_sigmoid_case(r, d) for r in in_tiers(SIGMOID, set(tiers) - {"bench"})]
        out += [_softmax_case(r, d) for r in in_tiers(SOFTMAX, set(tiers) - {"bench"})]
        out += [_softmax_case(r, d, probs=True) for r in in_tiers(SOFTMAX, set(tiers) - {"bench"})]
    if "bench" in tiers:
        out += [_sigmoid_case(r, d) for r in in_tiers(SIGMOID, ("bench",)) for d in (f32, bf16)]
        out += [_softmax_case(r, f32, probs) for r in in_tiers(SOFTMAX, ("bench",)) for probs in (False, True)]
    return out


# ---------------------------------------------------------------------------------------------
# sm_90 compile gate: the ops' own arguments (targets dtype, need_grad, sizes past 2^31)


def _sigmoid(n, dtype=f32, tdtype=None, reduction=1, need_grad=True):
    return (Meta((n,), dtype), Meta((n,), tdtype or dtype), 0.25, 2.0, 0.0, reduction, need_grad)


def _softmax(shape, dtype=f32, weight=False, reduction=1, need_grad=True, ignore=-100, smoothing=0.0, probs=None):
    """probs: the dtype of class-probability targets (the logits' shape) instead of int64 class indices."""
    N, C = shape[0], shape[1]
    tshape = (N, shape[2]) if len(shape) == 3 else (N,)
    target = Meta(shape, probs) if probs is not None else Meta(tshape, i64)
    return (Meta(shape, dtype), target, Meta((C,), f32) if weight else None, 2.0, smoothing, ignore,
            reduction, need_grad)


GATE = [
    GateCase("sigmoid-16M-fp32", "sigmoid_focal_triton", _sigmoid(1 << 24), bench=True),
    GateCase("sigmoid-16M-bf16", "sigmoid_focal_triton", _sigmoid(1 << 24, bf16), bench=True),
    GateCase("sigmoid-n1-fp64-none", "sigmoid_focal_triton", _sigmoid(1, f64, reduction=0)),
    GateCase("sigmoid-fp16-bool-sum-nograd", "sigmoid_focal_triton", _sigmoid(4097, f16, torch.bool, 2, False)),
    GateCase("sigmoid-uint8-targets", "sigmoid_focal_triton", _sigmoid(1 << 31, f32, torch.uint8)),
    GateCase("softmax-4M-C3-fp32", "softmax_focal_triton", _softmax((1 << 22, 3)), bench=True),
    GateCase("softmax-4M-C10-fp32", "softmax_focal_triton", _softmax((1 << 22, 10)), bench=True),
    GateCase("softmax-4M-C3-bf16", "softmax_focal_triton", _softmax((1 << 22, 3), bf16), bench=True),
    GateCase("softmax-4M-C10-bf16", "softmax_focal_triton", _softmax((1 << 22, 10), bf16), bench=True),
    GateCase("softmax-C1-N1-ignore1", "softmax_focal_triton", _softmax((1, 1), ignore=1, reduction=0)),
    GateCase("softmax-C4096-fp64-weight", "softmax_focal_triton",
             _softmax((7, 4096), f64, weight=True, smoothing=0.1)),
    GateCase("softmax-C4096-spatial-fp16", "softmax_focal_triton", _softmax((3, 4096, 5), f16, reduction=2)),
    GateCase("softmax-C4097-chunked", "softmax_focal_triton", _softmax((5, 4097), weight=True, reduction=0)),
    GateCase("softmax-C4097-chunked-spatial-fp64", "softmax_focal_triton",
             _softmax((2, 5000, 3), f64, need_grad=False)),
    GateCase("softmax-spatial-huge", "softmax_focal_triton", _softmax((3, 10, I32 // 8), bf16)),
    # class-probability targets
    GateCase("softmax-probs-4M-C10-fp32", "softmax_focal_triton", _softmax((1 << 22, 10), probs=f32), bench=True),
    GateCase("softmax-probs-4M-C10-bf16-fp32probs", "softmax_focal_triton",
             _softmax((1 << 22, 10), bf16, probs=f32), bench=True),
    GateCase("softmax-probs-C3-fp16-none-nograd", "softmax_focal_triton",
             _softmax((4097, 3), f16, reduction=0, need_grad=False, probs=f16)),
    GateCase("softmax-probs-C4096-spatial-fp64-weight", "softmax_focal_triton",
             _softmax((3, 4096, 5), f64, weight=True, smoothing=0.1, probs=f64)),
    GateCase("softmax-probs-C4097-chunked", "softmax_focal_triton", _softmax((5, 4097), weight=True, probs=f32)),
    GateCase("softmax-probs-C4097-chunked-spatial-bf16", "softmax_focal_triton",
             _softmax((2, 5000, 3), bf16, reduction=0, probs=bf16)),
    GateCase("softmax-probs-spatial-huge", "softmax_focal_triton", _softmax((3, 10, I32 // 16), bf16, probs=bf16)),
]
