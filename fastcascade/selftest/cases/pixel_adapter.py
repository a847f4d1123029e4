"""Case table of the pixel (token) residual adapter (pixel_adapter, _pixel_adapter_backward): the shapes
the tests, the self-test and the sm_90 compile gate draw."""

from __future__ import annotations

import torch

from .common import DROPOUT_EDGES, GateCase, Meta, Shape, adapter_case, adapter_weight_specs, in_tiers

f16, bf16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

DTYPES = (f32, bf16)  # the tests' dtypes
QUICK_TOKENS = 257  # the quick self-test's awkward token count: the interpreter runs one tile at a time

# (B, C, H, W) maps or "tokens" (T, C); kw r (the bottleneck) and act (the self-test's activation; the
# tests run every one)
SHAPES = (
    Shape((3, 12, 5, 7), kw=dict(r=5)),
    Shape((3, 12, 5, 7), layout="channels_last", kw=dict(r=16)),
    Shape((1, 3, 1, 1), kw=dict(r=1)),
    Shape((37, 12), layout="tokens", kw=dict(r=5)),
    Shape((130, 20), layout="tokens", kw=dict(r=64)),
    Shape((33, 24), "small", test=False, layout="tokens", kw=dict(r=8, act="relu")),
    Shape((4097, 7), "awkward", test=False, layout="tokens", kw=dict(r=3, act="gelu", quick=(QUICK_TOKENS, 7))),
    Shape((2, 16, 5, 7), "awkward", test=False, layout="channels_last", kw=dict(r=4, act="silu")),
    Shape((1, 8, 3, 3), "awkward", test=False, kw=dict(r=1, act="relu")),
    Shape((1 << 20, 768), "bench", test=False, layout="tokens", kw=dict(r=64, act="relu")),
)
# the interpreter's test of the Triton kernels' chunked path of a wide r (r = 40 in chunks of 16)
WIDE_R_SHAPES = (Shape((2, 12, 3, 5)), Shape((37, 12), layout="tokens"))


def memory_format(row):
    """The tests' memory format of a row; None for tokens (T, C)."""
    return {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last, "tokens": None}[row.layout]


def selftest_cases(dtypes, tiers, quick=False) -> list:
    out = [adapter_case("pixel", r, d, r.get("quick") if quick else None)
           for d in dtypes for r in in_tiers(SHAPES, set(tiers) - {"bench"})]
    if "bench" in tiers:
        out += [adapter_case("pixel", r, bf16) for r in in_tiers(SHAPES, ("bench",))]
    return out


# ---------------------------------------------------------------------------------------------
# sm_90 compile gate


def _pixel(shape, r, dtype=f32, fmt="", act=0, scale=False, p=0.0, seed=0):
    C = shape[1] if len(shape) == 4 else shape[-1]
    return (Meta(shape, dtype, fmt), *adapter_weight_specs(C, r, dtype, scale), act, p, seed)


def _pixel_bwd(shape, r, dtype=f32, fmt="", act=0, scale=False, p=0.0, seed=0):
    x, *rest = _pixel(shape, r, dtype, fmt, act, scale, p, seed)
    return (x, x, *rest)


_FWD, _BWD = "pixel_adapter_triton", "_pixel_adapter_backward_triton"
_TOKENS = (1 << 20, 768)
GATE = [
    GateCase("token-1M-C768-r64-bf16-relu", _FWD, _pixel(_TOKENS, 64, bf16), bench=True),
    GateCase("token-bwd-1M-C768-r64-bf16-relu", _BWD, _pixel_bwd(_TOKENS, 64, bf16), bench=True),
    GateCase("token-bwd-1M-C768-r64-bf16-gelu", _BWD, _pixel_bwd(_TOKENS, 64, bf16, act=1), bench=True),
    GateCase("token-bwd-1M-C768-r64-fp32-gelu", _BWD, _pixel_bwd(_TOKENS, 64, f32, act=1), bench=True),
    GateCase("token-bwd-1M-C768-r64-fp32-silu-scale", _BWD, _pixel_bwd(_TOKENS, 64, f32, act=2, scale=True),
             bench=True),
    GateCase("pixel-T1-C1-r1", _FWD, _pixel((1, 1), 1)),
    GateCase("pixel-bwd-B1-C1-r1-nchw", _BWD, _pixel_bwd((1, 1, 1, 1), 1)),
    GateCase("pixel-C4096-r1000-fp32-cl", _FWD, _pixel((2, 4096, 3, 3), 1000, fmt="cl")),
    GateCase("pixel-bwd-C4096-r1000-fp32-gelu-scale", _BWD, _pixel_bwd((4096, 4096), 1000, act=1, scale=True)),
    GateCase("pixel-r4096-bf16", _FWD, _pixel((4096, 768), 4096, bf16, act=1)),
    GateCase("pixel-bwd-r4096-bf16", _BWD, _pixel_bwd((4096, 768), 4096, bf16, act=2)),
    GateCase("pixel-r256-fp64-scale", _FWD, _pixel((3, 40, 9, 11), 256, f64, scale=True)),
    GateCase("pixel-bwd-r16-fp64", _BWD, _pixel_bwd((3, 40, 9, 11), 16, f64, act=1)),
    GateCase("pixel-fp16-nchw", _FWD, _pixel((2, 64, 7, 7), 64, f16)),
    GateCase("pixel-huge-sample-nchw", _FWD, _pixel((1, 1 << 16, 256, 256), 16, bf16)),
    GateCase("pixel-bwd-huge-sample-nchw", _BWD, _pixel_bwd((1, 1 << 16, 256, 256), 16)),
    *[GateCase(f"pixel-dropout-p{p:g}-seed{seed}", _FWD, _pixel((4096, 768), 64, p=p, seed=seed))
      for p, seed in DROPOUT_EDGES],
    *[GateCase(f"pixel-bwd-dropout-p{p:g}-seed{seed}", _BWD, _pixel_bwd((4096, 768), 64, p=p, seed=seed))
      for p, seed in DROPOUT_EDGES],
]
