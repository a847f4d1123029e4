"""Pixel / token residual adapter, forward and forward + backward: fastcascade backends vs the eager
module and torch.compile of it, same run.

Run: pytest bench/test_bench_pixel_adapter.py --benchmark-only
"""

import pytest
import torch
from bench_utils import DEVICE, module_backends, record

import fastcascade as fc

# pixel (token) adapter: tokens (T, C) with r = 64; the shape is T=1M, C=768 in bf16
TOKEN_SHAPES = [(1 << 20, 768)] if DEVICE == "cuda" else [(1 << 14, 768)]
TOKEN_DTYPES = [torch.bfloat16] if DEVICE == "cuda" else [torch.float32]


@pytest.mark.parametrize("impl", list(module_backends()))
@pytest.mark.parametrize("dtype", TOKEN_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", TOKEN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.headline
def test_token_adapter(benchmark, impl, dtype, shape, mode):
    """Bytes: forward reads x and writes y; backward (recomputing the hidden layer) reads x and grad_y
    and writes grad_x."""
    T, C = shape
    benchmark.group = f"token_adapter {mode} T={T} C={C} {str(dtype)[6:]} r=64"
    backend = module_backends()[impl]
    m = fc.ResidualAdapter(C, 64, "pixel", init_std=0.02, backend="torch" if backend == "compile" else backend)
    m = m.to(DEVICE)
    fn = torch.compile(m) if backend == "compile" else m
    x = torch.randn(shape, device=DEVICE, dtype=dtype).requires_grad_(mode != "fwd")
    g = torch.randn_like(x)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                return fn(x)
        x.grad = None
        for p in m.parameters():
            p.grad = None
        fn(x).backward(g)

    record(benchmark, step, (2 if mode == "fwd" else 5) * x.numel() * x.element_size())
