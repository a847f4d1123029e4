"""Case table of the Dice + focal family (dice_focal, _dice_focal_backward): the shapes the tests, the
self-test and the sm_90 compile gate draw."""

from __future__ import annotations

import torch

from ... import reference
from .common import Case, GateCase, Meta, Shape, in_tiers, public_api, randint, randn

f16, bf16, f32, f64, i64 = torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64

DTYPES = (f32, bf16, f16)  # the tests' dtypes

# (B, C, d1, ...). kw of a self-test row: weighted, ignore, include_background, batch_dice
SHAPES = (
    Shape((1, 2, 5, 7)),
    Shape((3, 16, 9, 11)),
    Shape((2, 3, 33)),
    Shape((2, 4, 3, 5, 3)),
    Shape((4, 1, 6, 5)),  # one class
    Shape((2, 4, 8, 8), "small", test=False),
    Shape((1, 3, 7, 9), "awkward", test=False,
          kw=dict(weighted=True, ignore=2, include_background=False, batch_dice=False)),
    Shape((2, 5, 7, 7), "awkward", test=False, layout="channels_last"),
    Shape((1, 2, 3, 4, 5), "awkward", test=False),
    Shape((16, 16, 384, 384), "bench", test=False),
)

# the tests' loss options: (weight, include_background, ignore_index, batch_dice, smooth, gamma, lambda_dice,
# lambda_focal)
OPTIONS = (
    (False, True, None, True, 1.0, 2.0, 0.5, 0.5),
    (True, False, 255, False, 1e-5, 0.5, 1.0, 0.3),
    (True, True, -100, True, 0.0, 0.0, 0.7, 1.0),
    (False, False, None, False, 2.0, 5.0, 1.0, 0.0),
    (True, True, 1, False, 1.0, 2.5, 0.0, 1.0),
)


def _case(row, dtype):
    shape = row.shape
    B, C = shape[:2]
    weighted, ignore = row.get("weighted", False), row.get("ignore")
    include_background, batch_dice = row.get("include_background", True), row.get("batch_dice", True)
    channels_last = row.layout == "channels_last"

    def make(gen, device):
        x = randn(gen, device, shape, dtype, 3.0)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        t = randint(gen, device, C, (B,) + tuple(shape[2:]))
        w = torch.rand(C, generator=gen, device=device) + 0.5 if weighted else None
        return [x, t] + ([w] if weighted else [])

    kw = dict(ignore_index=ignore, include_background=include_background, batch_dice=batch_dice)

    def public(b, x, t, w=None):
        return public_api().dice_focal_loss(x, t, w, backend=b, **kw)

    def ref(x, t, w=None):
        return reference.dice_focal_loss(x, t, w, **kw)

    label = row.label + (" nhwc" if channels_last else "")
    if ignore is not None or not include_background or not batch_dice:
        label += " per-image" if not batch_dice else " options"
    return Case("dice_focal", row.tier, label, dtype, make, public, ref,
                ("logits", "target") + (("weight",) if weighted else ()), ("loss",), diff=(0,))


def selftest_cases(dtypes, tiers, quick=False) -> list:
    out = [_case(r, d) for d in dtypes for r in in_tiers(SHAPES, set(tiers) - {"bench"})]
    if "bench" in tiers:
        out += [_case(r, bf16) for r in in_tiers(SHAPES, ("bench",))]
    return out


# ---------------------------------------------------------------------------------------------
# sm_90 compile gate


def _dice(B, C, S, dtype=f32, weight=False, ignore=-100):
    return (Meta((B, C, S), dtype), Meta((B, S), i64), Meta((C,), f32) if weight else None, 2.0, 1.0, 0.5, 0.5,
            ignore, True, True)


def _dice_bwd(B, C, S, dtype=f32, weight=False, ignore=-100):
    acc = f64 if dtype == f64 else f32
    x, t, w = _dice(B, C, S, dtype, weight, ignore)[:3]
    return (Meta((), acc), x, t, w, Meta((B, C), acc), Meta((B, C), acc), Meta((2,), acc), 2.0, 1.0, 0.5, 0.5,
            ignore, True, True)


GATE = [
    GateCase("dice-16x16x384^2-fp32", "dice_focal_triton", _dice(16, 16, 384 * 384), bench=True),
    GateCase("dice-16x16x384^2-bf16", "dice_focal_triton", _dice(16, 16, 384 * 384, bf16), bench=True),
    GateCase("dice-bwd-16x16x384^2-fp32", "_dice_focal_backward_triton", _dice_bwd(16, 16, 384 * 384), bench=True),
    GateCase("dice-bwd-16x16x384^2-bf16", "_dice_focal_backward_triton", _dice_bwd(16, 16, 384 * 384, bf16),
             bench=True),
    GateCase("dice-B1-C1-S1-ignore1", "dice_focal_triton", _dice(1, 1, 1, ignore=1)),
    GateCase("dice-bwd-B1-C1-S1-ignore1", "_dice_focal_backward_triton", _dice_bwd(1, 1, 1, ignore=1)),
    GateCase("dice-C4096-fp64-weight", "dice_focal_triton", _dice(2, 4096, 33, f64, weight=True)),
    GateCase("dice-bwd-C4096-fp16-weight", "_dice_focal_backward_triton",
             _dice_bwd(2, 4096, 33, f16, weight=True)),
]
