"""Shared test setup: which backends run here, and the tolerance model."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton kernels run on CPU tensors through the interpreter; set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastcascade import _ops  # noqa: E402  (after TRITON_INTERPRET is set)

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def backend_params():
    """(backend, device) pairs that can run here; GPU ones carry the gpu marker and skip without a GPU."""
    params = [pytest.param("cpu", "cpu", id="cpu"), pytest.param("torch", "cpu", id="torch")]
    if _ops.HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
        params.append(pytest.param("triton", "cpu", id="triton-interp"))
    params += [
        pytest.param("cuda", "cuda", id="cuda", marks=[gpu, needs_cuda]),
        pytest.param("triton", "cuda", id="triton-cuda", marks=[gpu, needs_cuda]),
    ]
    return params


def fused_backend_params():
    return [p for p in backend_params() if p.values[0] != "torch"]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    assert not torch.isnan(a).any(), "NaN in output"
    denom = ref.norm().item()
    return (a - ref).norm().item() / (denom if denom > 0 else 1.0)


def assert_within_model(out: torch.Tensor, ref64: torch.Tensor, ref_same_dtype: torch.Tensor, what: str = ""):
    """Tolerance model: error vs a float64 reference at most 2x the error of the reference computed in
    the same dtype, plus a floor of a few units of the dtype's precision (the reference can be exact)."""
    err = rel_err(out, ref64)
    # The plain reference can itself give NaN in low precision (e.g. (1 - p)^0.5 once p rounds to 1);
    # measure its error on the entries where it is finite.
    ref_same_dtype = torch.where(torch.isfinite(ref_same_dtype), ref_same_dtype.to(ref64.dtype), ref64)
    base = rel_err(ref_same_dtype, ref64)
    floor = 16 * torch.finfo(out.dtype).eps
    assert err <= 2 * base + floor, f"{what}: error {err:.3g} > 2 x reference error {base:.3g} + {floor:.3g}"


def random_logits(shape, dtype=torch.float32, device="cpu", scale=3.0, generator=None):
    """Fresh random logits (never zeros), spread so that some saturate."""
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
