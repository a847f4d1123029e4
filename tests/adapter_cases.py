"""Inputs and helpers shared by the pooled and pixel adapter op tests (tests/test_pooled_adapter.py,
tests/test_pixel_adapter.py)."""

import os

import pytest
import torch
from conftest import fused_backend_params

import fastcascade as fc

ADAPTER_BACKENDS = fused_backend_params()
ACTIVATIONS = ["relu", "gelu", "silu"]
INTERPRETED_AOT = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                     reason="AOT tracing of Triton kernels needs a GPU (not the interpreter)")


def adapter_weights(C, r, std=0.3, gen=None, dtype=torch.float64):
    def rnd(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype)
    return [rnd(r, C), rnd(r), rnd(C, r), rnd(C)]


def adapter_x(shape, fmt, dtype=torch.float64, gen=None):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(memory_format=fmt)


def fwd_bwd(fn, x, params):
    x = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in params]
    y = fn(x, *params)
    # upstream gradient exactly representable in every dtype under test (bf16 values in [0.5, 1.5))
    g = (torch.rand(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5)
    g = g.to(torch.bfloat16).to(y.dtype)
    (y * g.to(y.device)).sum().backward()
    return y.detach(), [x.grad] + [p.grad for p in params]


def flat_ref(ref, x, *params):
    y, grads = fwd_bwd(ref, x, params)
    return [y] + grads


def check_runs_on_the_tensors_device(kind: str) -> None:
    """Triton launches on the current device: an adapter on cuda:1 while cuda:0 is current must still
    run on cuda:1 (the op guards the launch with the tensors' device)."""
    torch.manual_seed(0)
    m = fc.ResidualAdapter(16, 8, kind, "gelu", init_std=0.3, backend="triton")
    ref = fc.ResidualAdapter(16, 8, kind, "gelu", init_std=0.3, backend="torch")
    ref.load_state_dict(m.state_dict())
    x = torch.randn(4, 16, 5, 5)
    m = m.to("cuda:1")
    with torch.cuda.device(0):
        y = m(x.to("cuda:1").requires_grad_(True))
        y.sum().backward()
        torch.cuda.synchronize(1)
    torch.testing.assert_close(y.detach().cpu(), ref(x).detach(), rtol=1e-4, atol=1e-5)
