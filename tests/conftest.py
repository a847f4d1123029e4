"""Shared test setup: which backends run here, and the tolerance model."""

import os
import zlib

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


def assert_within_model(out: torch.Tensor, ref64: torch.Tensor, ref_error: float, what: str = ""):
    """Tolerance model: error vs a float64 reference at most 2x the error of the reference computed in
    the same dtype (ref_error, from reference_errors), plus a floor of a few units of the dtype's
    precision (the reference can be exact)."""
    err = rel_err(out, ref64)
    floor = 16 * torch.finfo(out.dtype).eps
    assert err <= 2 * ref_error + floor, (
        f"{what}: error {err:.3g} > 2 x reference error {ref_error:.3g} + {floor:.3g}")


def reference_errors(ref_fn, inputs64, dtype, samples: int = 4, generator=None) -> list:
    """Per output of ref_fn, the largest relative error of ref_fn run in `dtype` against ref_fn run in
    float64, over the given inputs and `samples` copies of them nudged by a few units of dtype's precision.

    One draw is a noisy measure of what rounding does: where an output cancels (a gradient near its zero,
    a reduction of signed terms), the plain reference can land close to the truth by luck, and a kernel
    that rounds differently but no worse fails "2x the reference error". Taking the worst of a few rounding
    patterns measures the precision's error at that point rather than one outcome of it.
    ref_fn(*inputs) returns a list of tensors; non-floating inputs (targets, masks) are passed unchanged."""
    eps = torch.finfo(dtype).eps
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    worst = None
    for k in range(samples + 1):
        nudged = [a if k == 0 or not a.is_floating_point()
                  else a * (1 + 4 * eps * (2 * torch.rand(a.shape, generator=gen, dtype=a.dtype) - 1))
                  for a in inputs64]
        truth = ref_fn(*nudged)
        low = ref_fn(*[a.to(dtype) if a.is_floating_point() else a for a in nudged])
        # The plain reference can give NaN in low precision (e.g. (1 - p)^0.5 once p rounds to 1);
        # measure its error on the entries where it is finite.
        errs = [rel_err(torch.where(torch.isfinite(lo), lo.to(t.dtype), t), t) for lo, t in zip(low, truth)]
        worst = errs if worst is None else [max(a, b) for a, b in zip(worst, errs)]
    return worst


def seeded(*key) -> torch.Generator:
    """A generator seeded from the test's parameters. Not hash(): str hashing changes with every process
    (PYTHONHASHSEED), which made the drawn inputs, and so a test's outcome, differ between runs.
    FASTCASCADE_TEST_SEED=n draws other inputs, to probe the tolerance model with fresh cases."""
    salt = os.environ.get("FASTCASCADE_TEST_SEED", "")
    return torch.Generator().manual_seed(zlib.crc32((repr(key) + salt).encode()))


def random_logits(shape, dtype=torch.float32, device="cpu", scale=3.0, generator=None):
    """Fresh random logits (never zeros), spread so that some saturate."""
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
