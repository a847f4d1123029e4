"""The tolerance model: a backend's error against a float64 reference may be at most 2x the error of
the reference itself run in the same dtype, plus a floor of a few units of the dtype's precision.
Shared by the self-test and the test suite (tests/conftest.py)."""

from __future__ import annotations

import math

import torch

# ---------------------------------------------------------------------------------------------
# the tolerance model (also used by the test suite: tests/conftest.py imports it from here)

TOLERANCE_FACTOR = 2.0  # a backend may be at most this many times less accurate than the reference
EPS_FLOOR = 16  # ...plus this many units of the output dtype's precision (the reference can be exact)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error of a against ref, in float64 on ref's device; inf where a holds a NaN or the
    difference is not finite (a NaN is never "within tolerance")."""
    ref = ref.detach().to(torch.float64)
    a = a.detach().to(device=ref.device, dtype=torch.float64)
    if torch.isnan(a).any():
        return math.inf
    diff = (a - ref).norm().item()
    if not math.isfinite(diff):
        return math.inf
    denom = ref.norm().item()
    return diff / (denom if denom > 0 else 1.0)


def tolerance(ref_error: float, dtype: torch.dtype) -> float:
    """The largest error allowed of an output of `dtype` whose reference, run in that dtype, has error
    ref_error (both against the float64 reference)."""
    return TOLERANCE_FACTOR * ref_error + EPS_FLOOR * torch.finfo(dtype).eps


def _uniform_like(a: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if gen.device.type == a.device.type:
        return torch.rand(a.shape, generator=gen, dtype=a.dtype, device=a.device)
    return torch.rand(a.shape, generator=gen, dtype=a.dtype, device=gen.device).to(a.device)


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
                  else a * (1 + 4 * eps * (2 * _uniform_like(a, gen) - 1)) for a in inputs64]
        truth = ref_fn(*nudged)
        low = ref_fn(*[a.to(dtype) if a.is_floating_point() else a for a in nudged])
        # The plain reference can give NaN in low precision (e.g. (1 - p)^0.5 once p rounds to 1);
        # measure its error on the entries where it is finite.
        errs = [rel_err(torch.where(torch.isfinite(lo), lo.to(t.dtype), t), t) for lo, t in zip(low, truth)]
        worst = errs if worst is None else [max(a, b) for a, b in zip(worst, errs)]
    return worst
