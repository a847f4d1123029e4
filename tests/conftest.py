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
# the tolerance model has one home, shared with python -m fastcascade selftest
from fastcascade.selftest import reference_errors, tolerance  # noqa: E402, F401  (reference_errors: for the tests)
from fastcascade.selftest import rel_err as _rel_err  # noqa: E402

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
    assert not torch.isnan(a.detach()).any(), "NaN in output"
    return _rel_err(a, ref)


def assert_within_model(out: torch.Tensor, ref64: torch.Tensor, ref_error: float, what: str = ""):
    """Tolerance model (fastcascade.selftest.tolerance): error vs a float64 reference at most 2x the error
    of the reference computed in the same dtype (ref_error, from reference_errors), plus a floor of a few
    units of the dtype's precision (the reference can be exact)."""
    err = rel_err(out, ref64)
    tol = tolerance(ref_error, out.dtype)
    assert err <= tol, f"{what}: error {err:.3g} > tolerance {tol:.3g} (2 x reference error {ref_error:.3g} + floor)"


def seeded(*key) -> torch.Generator:
    """A generator seeded from the test's parameters. Not hash(): str hashing changes with every process
    (PYTHONHASHSEED), which made the drawn inputs, and so a test's outcome, differ between runs.
    FASTCASCADE_TEST_SEED=n draws other inputs, to probe the tolerance model with fresh cases."""
    salt = os.environ.get("FASTCASCADE_TEST_SEED", "")
    return torch.Generator().manual_seed(zlib.crc32((repr(key) + salt).encode()))


def random_logits(shape, dtype=torch.float32, device="cpu", scale=3.0, generator=None):
    """Fresh random logits (never zeros), spread so that some saturate."""
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (pytestmark = pytest.mark.usefixtures("one_thread")): their
    models are tiny, so more threads only add overhead, and contention on a shared CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    """Tests marked `sweep` (larger shapes, by hand) run only when -m names the marker."""
    if "sweep" in (config.option.markexpr or ""):
        return
    kept = [i for i in items if i.get_closest_marker("sweep") is None]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[i for i in items if i.get_closest_marker("sweep") is not None])
        items[:] = kept
