"""Case table of the pooled residual adapter (pooled_adapter, _pooled_adapter_backward): the shapes the
tests, the self-test and the sm_90 compile gate draw."""

from __future__ import annotations

import torch

from .common import DROPOUT_EDGES, GateCase, Meta, Shape, adapter_case, adapter_weight_specs, in_tiers

f16, bf16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

DTYPES = (f32, bf16)  # the tests' dtypes

# (B, C, H, W), kw r (the bottleneck) and act (the self-test's activation; the tests run every one, in
# both memory formats)
SHAPES = (
    Shape((3, 12, 5, 7), "small", kw=dict(r=5, act="relu")),
    Shape((1, 3, 1, 1), "awkward", kw=dict(r=1, act="gelu")),
    Shape((7, 64, 4, 4), "awkward", layout="channels_last", kw=dict(r=64, act="silu")),
    Shape((2, 130, 2, 3), "awkward", kw=dict(r=16, act="gelu")),
    Shape((4096, 64, 4, 4), "bench", test=False, layout="channels_last", kw=dict(r=64, act="relu")),
)


def selftest_cases(dtypes, tiers, quick=False) -> list:
    out = [adapter_case("pooled", r, d) for d in dtypes for r in in_tiers(SHAPES, set(tiers) - {"bench"})]
    if "bench" in tiers:
        out += [adapter_case("pooled", r, bf16) for r in in_tiers(SHAPES, ("bench",))]
    return out


# ---------------------------------------------------------------------------------------------
# sm_90 compile gate


def _pooled(B, C, H, W, r, dtype=f32, fmt="cl", act=0, scale=False, p=0.0, seed=0):
    return (Meta((B, C, H, W), dtype, fmt), *adapter_weight_specs(C, r, dtype, scale), act, p, seed)


def _pooled_bwd(B, C, H, W, r, dtype=f32, fmt="cl", act=0, scale=False, p=0.0, seed=0):
    acc = f64 if dtype == f64 else f32
    x, dw, db, uw, ub, s, act, p, seed = _pooled(B, C, H, W, r, dtype, fmt, act, scale, p, seed)
    return (x, Meta((B, C), acc), Meta((B, r), acc), dw, uw, ub, s, act, p, seed)


_FWD, _BWD = "pooled_adapter_triton", "_pooled_adapter_backward_triton"
GATE = [
    GateCase("pooled-4096x64x4x4-fp32", _FWD, _pooled(4096, 64, 4, 4, 64), bench=True),
    GateCase("pooled-4096x64x4x4-bf16", _FWD, _pooled(4096, 64, 4, 4, 64, bf16), bench=True),
    GateCase("pooled-bwd-4096x64x4x4-fp32", _BWD, _pooled_bwd(4096, 64, 4, 4, 64), bench=True),
    GateCase("pooled-bwd-4096x64x4x4-bf16", _BWD, _pooled_bwd(4096, 64, 4, 4, 64, bf16), bench=True),
    GateCase("pooled-256x256x14x14-fp32", _FWD, _pooled(256, 256, 14, 14, 64)),
    GateCase("pooled-bwd-256x256x14x14-fp32", _BWD, _pooled_bwd(256, 256, 14, 14, 64)),
    GateCase("pooled-B1-C1-r1-HW1-nchw", _FWD, _pooled(1, 1, 1, 1, 1, fmt="")),
    GateCase("pooled-bwd-B1-C1-r1-HW1-nchw", _BWD, _pooled_bwd(1, 1, 1, 1, 1, fmt="")),
    GateCase("pooled-C4096-r1024-fp64-gelu-scale", _FWD, _pooled(3, 4096, 2, 2, 1024, f64, act=1, scale=True)),
    GateCase("pooled-bwd-C4096-r1024-fp16-silu-scale", _BWD,
             _pooled_bwd(8192, 4096, 1, 1, 1024, f16, act=2, scale=True)),
    GateCase("pooled-huge-sample-nchw", _FWD, _pooled(2, 1 << 16, 256, 256, 8, bf16, fmt="")),
    GateCase("pooled-bwd-huge-sample-cl", _BWD, _pooled_bwd(2, 1 << 16, 256, 256, 8)),
    *[GateCase(f"pooled-dropout-p{p:g}-seed{seed}", _FWD, _pooled(4096, 64, 4, 4, 64, p=p, seed=seed))
      for p, seed in DROPOUT_EDGES],
    *[GateCase(f"pooled-bwd-dropout-p{p:g}-seed{seed}", _BWD, _pooled_bwd(64, 64, 4, 4, 64, p=p, seed=seed))
      for p, seed in DROPOUT_EDGES],
]
