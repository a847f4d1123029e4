"""``python -m fastcascade selftest`` and ``fastcascade.selftest()``: check every op on every backend here.

What a user runs on their own machine before trusting the kernels there. For every op of the public API
and every backend available on the device at hand (the C++ CPU kernels, the pure-PyTorch reference,
Triton; on a GPU the CUDA C++ kernels and compiled Triton), on random inputs at a few shapes:

- agreement with fastcascade.reference under the project's tolerance model: a float output's relative
  error against the reference run in float64 is at most 2x the error of the reference itself run in the
  same dtype (the worst of a few rounding patterns, see reference_errors), plus a floor of 16 units of the
  output dtype's precision; integer outputs (and row copies) must equal the reference exactly;
- forward and backward (the gradients of every differentiable input, with an upstream gradient that is
  not all ones);
- bitwise determinism: two runs on the same inputs give identical outputs and gradients;
- on CUDA, the time of one forward + backward (CUDA events) against the reference eager and, at the
  benchmark-sized shapes, torch.compile of the reference, and the achieved fraction of the device's copy
  bandwidth measured in the same run (bytes: each input read once, each output and gradient written once).

Shapes: small, awkward (1, 7, 4097, non-contiguous, channels_last, 3-D maps) and, on a GPU only,
benchmark-sized. ``quick=True`` (CI) keeps the small and awkward ones in fewer dtypes, times nothing
with torch.compile, and on a machine without a GPU sets TRITON_INTERPRET=1 for this process (before
the Triton kernels are imported) so that the Triton kernels run under the interpreter on CPU tensors.

All correctness rows run before any timing, so a run cut short still names a broken kernel; with a JSON
path the file is rewritten (atomically) after every row.

Note: ``fastcascade.selftest`` is this function, which shadows the module of the same name on the
package; reach the module with ``importlib.import_module("fastcascade.selftest")``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import statistics
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable, Sequence

import torch

from . import _ops, reference

__all__ = ["SelftestResult", "SelftestRow", "reference_errors", "rel_err", "selftest", "tolerance"]

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


# ---------------------------------------------------------------------------------------------
# the cases: one op at one shape and dtype, with its inputs, public call and reference


@dataclasses.dataclass
class _Case:
    op: str
    tier: str  # "small" | "awkward" | "bench"
    shape: str  # what the table shows
    dtype: torch.dtype
    make: Callable  # (generator, device) -> list of inputs (floating ones in dtype, or fp32 parameters)
    public: Callable  # (backend, *args) -> Tensor or tuple: the public API
    ref: Callable  # (*args) -> Tensor or tuple: fastcascade.reference
    names: tuple  # of the inputs
    outputs: tuple  # names of the forward outputs
    diff: tuple = ()  # indices of the inputs that get a gradient
    exact: frozenset = frozenset()  # outputs (and "grad <input>") compared exactly with the reference
    views: dict = dataclasses.field(default_factory=dict)  # input index -> the view the op receives
    module: Callable | None = None  # (backend, device) -> nn.Module of inputs[0]; inputs[1:] are its parameters

    @property
    def key(self) -> str:
        return f"{self.op} {self.shape} {_DTYPE_NAMES[self.dtype]}"

    @property
    def all_outputs(self) -> list:
        return list(self.outputs) + [f"grad {self.names[i]}" for i in self.diff]

    @property
    def float_outputs(self) -> bool:
        return any(n not in self.exact for n in self.all_outputs)


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
                torch.int64: "int64", torch.int32: "int32", torch.uint8: "uint8"}


def _randn(gen, device, shape, dtype, scale=1.0):
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)


def _randint(gen, device, high, shape, dtype=torch.int64):
    return torch.randint(0, high, shape, generator=gen, device=device).to(dtype)


def _fc():
    import fastcascade  # the public API, resolved at call time (no import cycle with the package)

    return fastcascade


def _sigmoid_cases(dtypes, tiers):
    def case(tier, shape, dtype, alpha=0.25, gamma=2.0, reduction="mean", eps=0.0, view=None, label=None):
        base = shape if view is None else view[0]

        def make(gen, device):
            x = _randn(gen, device, base, dtype, 3.0)
            t_shape = x.shape if view is None else view[1](x).shape
            t = (torch.rand(t_shape, generator=gen, device=device) > 0.7).to(torch.float32)
            return [x, t]

        return _Case("sigmoid_focal", tier, label or f"{'x'.join(map(str, shape))} {reduction}", dtype, make,
                     lambda b, x, t: _fc().sigmoid_focal_loss(x, t, alpha, gamma, reduction, eps, backend=b),
                     lambda x, t: reference.sigmoid_focal_loss(x, t, alpha, gamma, reduction, eps),
                     ("logits", "targets"), ("loss",), diff=(0,), views={0: view[1]} if view else {})

    out = []
    for d in dtypes:
        if "small" in tiers:
            out.append(case("small", (64, 37), d))
        if "awkward" in tiers:
            out += [case("awkward", (4097,), d, None, 0.5, "none", 0.1),
                    case("awkward", (1,), d, 0.6, 5.0, "sum"),
                    case("awkward", (7, 65), d, reduction="sum", view=((7, 130), lambda x: x[:, ::2]),
                         label="7x65 strided sum")]
    if "bench" in tiers:
        out += [case("bench", (1 << 24,), d) for d in (torch.float32, torch.bfloat16)]
    return out


def _softmax_cases(dtypes, tiers):
    def case(tier, shape, dtype, gamma=2.0, weighted=False, ignore=-100, eps=0.0, reduction="mean",
             channels_last=False):
        C = shape[1]
        t_shape = (shape[0],) + tuple(shape[2:])

        def make(gen, device):
            x = _randn(gen, device, shape, dtype, 3.0)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            t = _randint(gen, device, C, t_shape)
            t.view(-1)[0] = (ignore + 1) % C  # at least one counted row ("mean" over none is NaN)
            w = torch.rand(C, generator=gen, device=device) + 0.5 if weighted else None
            return [x, t] + ([w] if weighted else [])

        def split(args):
            return args[0], args[1], (args[2] if weighted else None)

        def public(b, *args):
            x, t, w = split(args)
            return _fc().softmax_focal_loss(x, t, gamma, w, ignore, eps, reduction, backend=b)

        def ref(*args):
            x, t, w = split(args)
            return reference.softmax_focal_loss(x, t, gamma, w, ignore, eps, reduction)

        label = "x".join(map(str, shape)) + (" nhwc" if channels_last else "") + f" {reduction}"
        return _Case("softmax_focal", tier, label, dtype, make, public, ref,
                     ("logits", "target") + (("weight",) if weighted else ()), ("loss",), diff=(0,))

    out = []
    for d in dtypes:
        if "small" in tiers:
            out.append(case("small", (33, 10), d, weighted=True))
        if "awkward" in tiers:
            out += [case("awkward", (4097, 3), d, 0.5, True, 1, 0.05, "none"),
                    case("awkward", (1, 3), d, reduction="sum"),
                    case("awkward", (2, 4, 3, 5), d), case("awkward", (2, 5, 7, 9), d, channels_last=True)]
    if "bench" in tiers:
        out.append(case("bench", (1 << 22, 10), torch.float32))
    return out


def _dice_cases(dtypes, tiers):
    def case(tier, shape, dtype, weighted=False, ignore=None, include_background=True, batch_dice=True,
             channels_last=False):
        B, C = shape[:2]

        def make(gen, device):
            x = _randn(gen, device, shape, dtype, 3.0)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            t = _randint(gen, device, C, (B,) + tuple(shape[2:]))
            w = torch.rand(C, generator=gen, device=device) + 0.5 if weighted else None
            return [x, t] + ([w] if weighted else [])

        kw = dict(ignore_index=ignore, include_background=include_background, batch_dice=batch_dice)

        def public(b, x, t, w=None):
            return _fc().dice_focal_loss(x, t, w, backend=b, **kw)

        def ref(x, t, w=None):
            return reference.dice_focal_loss(x, t, w, **kw)

        label = "x".join(map(str, shape)) + (" nhwc" if channels_last else "")
        if ignore is not None or not include_background or not batch_dice:
            label += " per-image" if not batch_dice else " options"
        return _Case("dice_focal", tier, label, dtype, make, public, ref,
                     ("logits", "target") + (("weight",) if weighted else ()), ("loss",), diff=(0,))

    out = []
    for d in dtypes:
        if "small" in tiers:
            out.append(case("small", (2, 4, 8, 8), d))
        if "awkward" in tiers:
            out += [case("awkward", (1, 3, 7, 9), d, True, 2, False, False),
                    case("awkward", (2, 5, 7, 7), d, channels_last=True), case("awkward", (1, 2, 3, 4, 5), d)]
    if "bench" in tiers:
        out.append(case("bench", (16, 16, 384, 384), torch.bfloat16))
    return out


def _adapter_cases(kind, dtypes, tiers, tokens=4097):
    """tokens: the awkward token count (fewer in the quick run: the interpreter runs one tile at a time)."""
    op = f"{kind}_adapter"

    def case(tier, shape, r, dtype, act, channels_last=False):
        C = shape[1] if (kind == "pooled" or len(shape) == 4) else shape[-1]

        def make(gen, device):
            x = _randn(gen, device, shape, dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            # weights large enough that the adapter branch matters next to the identity; fp32 parameters
            # with a low-precision x, as under autocast
            return [x] + [_randn(gen, device, s, torch.float32, 0.3) for s in ((r, C), (r,), (C, r), (C,))]

        def module(b, device):
            return _fc().ResidualAdapter(C, r, kind, act, backend=b, device=device)

        def ref(x, dw, db, uw, ub):
            if kind == "pooled":
                return reference.pooled_adapter(x, dw, db, uw, ub, act)
            return reference.pixel_adapter(x, dw, db, uw, ub, act, channel_dim=1 if x.dim() == 4 else -1)

        label = "x".join(map(str, shape)) + (" nhwc" if channels_last else "") + f" r={r} {act}"
        return _Case(op, tier, label, dtype, make, None, ref, ("x", "down_w", "down_b", "up_w", "up_b"),
                     ("y",), diff=(0, 1, 2, 3, 4), module=module)

    out = []
    for d in dtypes:
        if kind == "pooled":
            if "small" in tiers:
                out.append(case("small", (3, 12, 5, 7), 5, d, "relu"))
            if "awkward" in tiers:
                out += [case("awkward", (1, 3, 1, 1), 1, d, "gelu"),
                        case("awkward", (7, 64, 4, 4), 64, d, "silu", True),
                        case("awkward", (2, 130, 2, 3), 16, d, "gelu")]
        else:
            if "small" in tiers:
                out.append(case("small", (33, 24), 8, d, "relu"))
            if "awkward" in tiers:
                out += [case("awkward", (tokens, 7), 3, d, "gelu"),
                        case("awkward", (2, 16, 5, 7), 4, d, "silu", True),
                        case("awkward", (1, 8, 3, 3), 1, d, "relu")]
    if "bench" in tiers:
        if kind == "pooled":
            out.append(case("bench", (4096, 64, 4, 4), 64, torch.bfloat16, "relu", True))
        else:
            out.append(case("bench", (1 << 20, 768), 64, torch.bfloat16, "relu"))
    return out


def _with_specials(x):
    """Logits with a NaN, a +inf and a -inf row entry where there is room (the ops define those)."""
    flat = x.view(-1)
    if flat.numel() >= 16:
        flat[3], flat[7], flat[11] = math.nan, math.inf, -math.inf
    return x


def _decision_cases(dtypes, tiers):
    out = []

    def threshold(tier, shape, dtype, view=None, label=None):
        def make(gen, device):
            return [_with_specials(_randn(gen, device, shape, dtype, 3.0))]

        return _Case("route_threshold", tier, label or "x".join(map(str, shape)), dtype, make,
                     lambda b, x: _fc().route_threshold(x, 0.3, 1.5, backend=b),
                     lambda x: reference.route_threshold(x, 0.3, 1.5), ("logits",), ("branch",),
                     exact=frozenset({"branch"}), views={0: view} if view else {})

    def rowwise(op, tier, shape, dtype, transposed=False):
        base = shape[::-1] if transposed else shape

        def make(gen, device):
            return [_with_specials(_randn(gen, device, base, dtype, 3.0))]

        if op == "route_argmax":
            public, ref = (lambda b, x: _fc().route_argmax(x, backend=b)), reference.route_argmax
        else:
            public = lambda b, x: _fc().route_confident(x, 0.6, 1.5, backend=b)  # noqa: E731
            ref = lambda x: reference.route_confident(x, 0.6, 1.5)  # noqa: E731
        label = "x".join(map(str, shape)) + (" transposed" if transposed else "")
        return _Case(op, tier, label, dtype, make, public, ref, ("logits",), ("branch",),
                     exact=frozenset({"branch"}), views={0: (lambda x: x.t())} if transposed else {})

    for d in dtypes:
        if "small" in tiers:
            out += [threshold("small", (1000,), d), rowwise("route_argmax", "small", (1000, 4), d),
                    rowwise("route_confident", "small", (1000, 4), d)]
        if "awkward" in tiers:
            out += [threshold("awkward", (1,), d), threshold("awkward", (4097, 1), d),
                    threshold("awkward", (4097, 2), d, lambda x: x[:, 1], "4097 strided")]
            for op in ("route_argmax", "route_confident"):
                out += [rowwise(op, "awkward", (1, 1), d), rowwise(op, "awkward", (4097, 7), d),
                        rowwise(op, "awkward", (7, 4097), d, transposed=True)]
    if "bench" in tiers:
        out += [threshold("bench", (1 << 24,), torch.float32),
                rowwise("route_argmax", "bench", (1 << 22, 10), torch.float32),
                rowwise("route_confident", "bench", (1 << 22, 10), torch.float32)]
    return out


def _routing_cases(dtypes, tiers):
    """partition, gather_rows / scatter_rows and vote. The vote's labels are compared exactly: its P sums
    differ between backends by a few ulp, so a hard-vote tie broken by P can flip where two classes' P lie
    within ~1e-7; the benchmark-sized vote keeps N at 2^18 rows, where that is expected about once in a
    hundred runs."""
    out = []

    def partition(tier, n, nb, idtype=torch.int64):
        def make(gen, device):
            return [_randint(gen, device, nb, (n,), idtype)]

        return _Case("partition", tier, f"{n} B={nb} {str(idtype)[6:]}", torch.int64, make,
                     lambda b, br: tuple(_fc().partition(br, nb, backend=b)),
                     lambda br: reference.partition(br, nb), ("branch",), ("order", "counts", "offsets"),
                     exact=frozenset({"order", "counts", "offsets"}))

    def gather(tier, shape, m, dtype, idtype=torch.int64):
        def make(gen, device):
            x = _randn(gen, device, shape, dtype)
            return [x, torch.randperm(shape[0], generator=gen, device=device)[:m].to(idtype)]

        return _Case("gather_rows", tier, f"{'x'.join(map(str, shape))} M={m}", dtype, make,
                     lambda b, x, i: _fc().gather_rows(x, i, backend=b), reference.gather_rows, ("x", "index"),
                     ("y",), diff=(0,), exact=frozenset({"y", "grad x"}))

    def scatter(tier, shape, rows, dtype, idtype=torch.int64):
        def make(gen, device):
            src = _randn(gen, device, shape, dtype)
            return [src, torch.randperm(rows, generator=gen, device=device)[:shape[0]].to(idtype)]

        return _Case("scatter_rows", tier, f"{'x'.join(map(str, shape))} R={rows}", dtype, make,
                     lambda b, s, i: _fc().scatter_rows(s, i, rows, backend=b),
                     lambda s, i: reference.scatter_rows(s, i, rows), ("src", "index"), ("y",), diff=(0,),
                     exact=frozenset({"y", "grad src"}))

    def vote(tier, shape, mode, dtype):
        def make(gen, device):
            return [_randn(gen, device, shape, dtype, 2.0)]

        return _Case("vote", tier, f"{'x'.join(map(str, shape))} {mode}", dtype, make,
                     lambda b, x: _fc().vote(x, mode, return_probs=True, backend=b),
                     lambda x: reference.vote(x, mode, return_probs=True), ("member_logits",),
                     ("labels", "probs"), exact=frozenset({"labels"}))

    if "small" in tiers:
        out.append(partition("small", 1000, 3))
    if "awkward" in tiers:
        out += [partition("awkward", 1, 1), partition("awkward", 4097, 7, torch.int32)]
    for d in dtypes:
        if "small" in tiers:
            out += [gather("small", (1000, 16), 600, d), scatter("small", (600, 16), 1000, d),
                    vote("small", (3, 100, 4), "hard", d)]
        if "awkward" in tiers:
            out += [gather("awkward", (1, 1), 1, d), gather("awkward", (4097, 7), 4097, d, torch.int32),
                    gather("awkward", (50, 3, 5), 7, d), scatter("awkward", (1, 1), 1, d),
                    scatter("awkward", (4097, 7), 5000, d, torch.int32), vote("awkward", (1, 1, 1), "soft", d),
                    vote("awkward", (5, 4097, 7), "hard", d), vote("awkward", (2, 3, 1000), "soft", d)]
    if "bench" in tiers:
        out += [partition("bench", 1 << 22, 3), gather("bench", (1 << 20, 512), 1 << 20, torch.float16),
                scatter("bench", (1 << 20, 512), 1 << 20, torch.float16),
                vote("bench", (3, 1 << 18, 4), "hard", torch.float32)]
    return out


def _confusion_cases(tiers):
    def case(tier, shape, C, ignore=None, idtype=torch.int64, view=None, label=None):
        def make(gen, device):
            pred = _randint(gen, device, C, shape, idtype)
            target = _randint(gen, device, C, shape, idtype)
            if ignore is not None:
                target.view(-1)[::5] = ignore
            return [pred, target]

        views = {0: view, 1: view} if view else {}
        label = label or f"{'x'.join(map(str, shape))} C={C}"
        return _Case("confusion_matrix", tier, label, torch.int64, make,
                     lambda b, p, t: _fc().confusion_matrix(p, t, C, ignore, backend=b),
                     lambda p, t: reference.confusion_matrix(p, t, C, ignore), ("pred", "target"), ("cm",),
                     exact=frozenset({"cm"}), views=views)

    out = []
    if "small" in tiers:
        out.append(case("small", (1000,), 5))
    if "awkward" in tiers:
        out += [case("awkward", (1,), 1), case("awkward", (4097,), 7, 3, torch.int32),
                case("awkward", (3, 7, 9), 4, 255, torch.uint8),
                case("awkward", (7, 130), 6, view=lambda t: t[:, ::2], label="7x65 strided C=6")]
    if "bench" in tiers:
        out.append(case("bench", (1 << 24,), 10))
    return out


def _cases(quick: bool, device: torch.device) -> list:
    tiers = ("small", "awkward") + (() if quick or device.type != "cuda" else ("bench",))
    float_dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    # the losses and adapters are where low precision matters: bf16 even in the quick run, at the small shape
    lowp_small = [] if not quick else [torch.bfloat16]
    cases = []
    for builder in (_sigmoid_cases, _softmax_cases, _dice_cases):
        cases += builder(float_dtypes, tiers) + builder(lowp_small, ("small",))
    for kind in ("pooled", "pixel"):
        cases += (_adapter_cases(kind, float_dtypes, tiers, tokens=257 if quick else 4097)
                  + _adapter_cases(kind, lowp_small, ("small",)))
    cases += _decision_cases(float_dtypes, tiers) + _routing_cases(float_dtypes, tiers)
    cases += _confusion_cases(tiers)
    order = {"small": 0, "awkward": 1, "bench": 2}  # every op's small shape first: a broken kernel shows early
    return sorted(cases, key=lambda c: order[c.tier])


# ---------------------------------------------------------------------------------------------
# running one case


class _Upstream:
    """Upstream gradients, one per differentiable output: values in [0.5, 1.5) rounded to bf16, so
    exactly representable in every dtype under test (the float64 truth and a bf16 backend get the same
    one), and not all ones, so a backward that ignores its upstream gradient fails."""

    def __init__(self, seed: int):
        self.seed, self.cache = seed, {}

    def get(self, i: int, out: torch.Tensor) -> torch.Tensor:
        g = self.cache.get(i)
        if g is None or g.shape != out.shape or g.device != out.device:
            gen = torch.Generator(device=out.device).manual_seed(self.seed + i)
            g = (torch.rand(out.shape, generator=gen, device=out.device, dtype=torch.float64) + 0.5)
            g = self.cache[i] = g.to(torch.bfloat16)
        return g.to(out.dtype)


def _as_list(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _bind(case: _Case, impl: str, inputs: list, compiled=None):
    """(leaves, forward) for impl ("reference", "compile" or a backend): forward() runs the op once on
    views of the leaves, whose .grad the backward fills."""
    if case.module is not None and impl not in ("reference", "compile"):
        m = case.module(impl, inputs[0].device)
        params = list(m.parameters())
        with torch.no_grad():
            for p, v in zip(params, inputs[1:]):
                p.copy_(v)
        x = inputs[0].detach().clone().requires_grad_(True)
        view = case.views.get(0, lambda t: t)
        return [x] + params, lambda: _as_list(m(view(x)))
    args, leaves = list(inputs), []
    for i in case.diff:
        args[i] = inputs[i].detach().clone().requires_grad_(True)
        leaves.append(args[i])
    fn = {"reference": case.ref, "compile": compiled}.get(impl)
    if fn is None:
        fn = lambda *a: case.public(impl, *a)  # noqa: E731

    def forward():
        return _as_list(fn(*[case.views[i](a) if i in case.views else a for i, a in enumerate(args)]))

    return leaves, forward


def _step(leaves, forward, upstream: _Upstream) -> list:
    for t in leaves:
        t.grad = None
    outs = forward()
    pairs = [(o, upstream.get(i, o)) for i, o in enumerate(outs) if o.requires_grad]
    if leaves and pairs:
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return outs


def _execute(case: _Case, impl: str, inputs: list, upstream: _Upstream) -> list:
    """Forward outputs, then the gradient of every differentiable input, detached."""
    leaves, forward = _bind(case, impl, inputs)
    outs = [o.detach() for o in _step(leaves, forward, upstream)]
    return outs + [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach().reshape(-1).contiguous(), b.detach().reshape(-1).contiguous()
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.numel() else True


def _mismatches(a: torch.Tensor, b: torch.Tensor) -> int:
    a = a.to(b.device)
    if a.is_floating_point():
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    else:
        same = a == b
    return int((~same).sum())


# ---------------------------------------------------------------------------------------------
# results


@dataclasses.dataclass
class SelftestRow:
    """One op at one shape and dtype on one backend. error / tolerance are those of the output with the
    largest error-to-tolerance ratio (`worst`); exact outputs count `mismatches` elements instead."""

    op: str
    backend: str
    device: str
    tier: str
    shape: str
    dtype: str
    exact: bool  # every output compared exactly
    agrees: bool
    deterministic: bool | None
    error: float | None = None
    tolerance: float | None = None
    worst: str | None = None
    mismatches: int = 0
    failure: str | None = None  # why the row fails (or the exception a backend raised)
    ms: float | None = None
    eager_ms: float | None = None
    compile_ms: float | None = None
    vs_eager: float | None = None  # eager_ms / ms: > 1 is faster than the eager reference
    vs_compile: float | None = None
    frac_copy_bw: float | None = None
    bytes: int | None = None
    note: str | None = None

    @property
    def ok(self) -> bool:
        return self.agrees and self.deterministic is True and self.failure is None

    @property
    def status(self) -> str:
        if self.ok:
            return "ok"
        if self.failure and not self.agrees and self.deterministic is None:
            return "ERROR"
        flags = (("DISAGREES", not self.agrees), ("NONDETERMINISTIC", self.deterministic is False))
        return " ".join(s for s, bad in flags if bad) or "FAIL"


@dataclasses.dataclass
class SelftestResult:
    """What selftest() found: rows (one per op, shape, dtype and backend), the backends run and those
    skipped with the reason, and the environment. ok is True when every row agrees and is deterministic."""

    device: str
    device_name: str
    quick: bool
    backends: list
    skipped: dict
    rows: list
    environment: dict
    copy_bandwidth_gbps: float | None = None
    elapsed_s: float = 0.0
    complete: bool = False
    timing_cut: bool = False  # the timing budget ran out: some rows were not timed (correctness is complete)

    @property
    def ok(self) -> bool:
        return self.complete and bool(self.rows) and all(r.ok for r in self.rows)

    @property
    def failures(self) -> list:
        return [r for r in self.rows if not r.ok]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for row, r in zip(d["rows"], self.rows):
            row["ok"], row["status"] = r.ok, r.status
        d["ok"] = self.ok
        d["tolerance_model"] = (f"float outputs: relative L2 error vs the float64 reference <= "
                                f"{TOLERANCE_FACTOR:g} x the reference's own error in that dtype + {EPS_FLOOR} eps; "
                                f"integer outputs and row copies: exact")
        return d

    def table(self) -> str:
        head = ["op", "backend", "shape", "dtype", "max err / tol", "det", "ms", "vs eager", "vs compile",
                "copy BW", "status"]
        lines = []
        for r in self.rows:
            if r.failure and r.deterministic is None:
                err = "error"
            elif r.exact:
                err = "exact" if r.mismatches == 0 else f"{r.mismatches} differ"
            else:
                err = f"{_g(r.error)} / {_g(r.tolerance)}"
                err += f" +{r.mismatches} differ" if r.mismatches else ""
            det = {True: "yes", False: "NO", None: "-"}[r.deterministic]
            lines.append([r.op, r.backend, r.shape, r.dtype, err, det, _fmt(r.ms, "{:.3f}"),
                          _fmt(r.vs_eager, "{:.2f}x"), _fmt(r.vs_compile, "{:.2f}x"), _fmt(r.frac_copy_bw, "{:.0%}"),
                          r.status])
        widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
        fmt = " | ".join(f"{{:<{w}}}" for w in widths)
        out = [fmt.format(*head), "-+-".join("-" * w for w in widths)] + [fmt.format(*ln) for ln in lines]
        return "\n".join(line.rstrip() for line in out)

    def summary(self) -> str:
        n_bad = len(self.failures)
        skipped = "; ".join(f"{b}: {why}" for b, why in self.skipped.items())
        s = (f"fastcascade selftest on {self.device} ({self.device_name}){' --quick' if self.quick else ''}: "
             f"{len(self.rows)} rows, backends {', '.join(self.backends)}, {n_bad} failing, "
             f"{self.elapsed_s:.1f} s")
        if self.copy_bandwidth_gbps:
            s += f", copy bandwidth {self.copy_bandwidth_gbps:.0f} GB/s"
        if skipped:
            s += f"\nskipped backends: {skipped}"
        for r in self.failures:
            s += f"\nFAIL {r.op} {r.backend} {r.shape} {r.dtype}: {r.failure}"
        if self.timing_cut:
            s += "\nthe timing budget ran out: rows showing '-' were not timed"
        if not self.complete:
            s += "\nthe run did not complete"
        return s + ("\nPASS" if self.ok else "\nFAIL")

    def __str__(self) -> str:
        return self.table() + "\n\n" + self.summary()


def _g(v) -> str:
    return "-" if v is None else ("inf" if v == math.inf else f"{v:.2e}")


def _fmt(v, f: str) -> str:
    return "-" if v is None else f.format(v)


def _write_json_atomic(obj, path: pathlib.Path) -> None:
    """A temp file in the same folder, then os.replace: a reader sees the old file or the new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# the run


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r} ({e})") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA device is visible (torch.cuda.is_available() is "
                             f"False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are "
                             f"visible")
    return dev


def _backends(device: torch.device, quick: bool) -> tuple[list, dict]:
    """The backends to check on `device`, and the reason for each one left out."""
    run, skipped = [], {}
    if device.type == "cpu":
        run += ["cpu", "torch"]
        if not _ops.HAS_TRITON:
            skipped["triton"] = "the triton package is not installed"
        else:
            if quick and not torch.cuda.is_available() and "fastcascade.kernels" not in sys.modules:
                # Triton reads TRITON_INTERPRET when its kernels are decorated: set before they are imported
                os.environ["TRITON_INTERPRET"] = "1"
            if os.environ.get("TRITON_INTERPRET") != "1":
                skipped["triton"] = ("Triton runs on CPU tensors only under the interpreter: set "
                                     "TRITON_INTERPRET=1 before Python starts, or use --quick")
            else:
                run.append("triton")
        skipped["cuda"] = "no CUDA device here" if not torch.cuda.is_available() else "run with --device cuda"
    else:
        if _ops.CUDA_COMPILED:
            run.append("cuda")
        else:
            skipped["cuda"] = "this build has no CUDA kernels (rebuild with FASTCASCADE_FORCE_CUDA=1)"
        if _ops.HAS_TRITON:
            run.append("triton")
        else:
            skipped["triton"] = "the triton package is not installed"
        run.append("torch")
        skipped["cpu"] = "run with --device cpu"
    return run, skipped


def _environment(device: torch.device) -> dict:
    env = {"fastcascade": getattr(_fc(), "__version__", "?"), "torch": torch.__version__,
           "python": sys.version.split()[0], "cuda_compiled": _ops.CUDA_COMPILED,
           "has_triton": _ops.HAS_TRITON,
           "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1", "threads": torch.get_num_threads()}
    if _ops.HAS_TRITON:
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError as e:
            env["triton"] = f"import failed: {e}"
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
    return env


def _seed(case: _Case, seed: int) -> int:
    return (zlib.crc32(case.key.encode()) + seed) % (2**62)


def _check_case(case: _Case, backends: Sequence[str], device: torch.device, seed: int, samples: int) -> list:
    """The rows of one case: each backend run twice against the reference (exact outputs) and the float64
    truth under the tolerance model (float outputs)."""
    rows = [SelftestRow(case.op, backend, str(device), case.tier, case.shape, _DTYPE_NAMES[case.dtype],
                        exact=not case.float_outputs, agrees=False, deterministic=None) for backend in backends]
    try:
        gen = torch.Generator(device=device).manual_seed(_seed(case, seed))
        inputs = case.make(gen, device)
        up = _Upstream(_seed(case, seed) + 1)
        want = _execute(case, "reference", inputs, up)  # the reference in the backends' dtypes
        truth = ref_err = None
        if case.float_outputs:
            inputs64 = [t.to(torch.float64) if t.is_floating_point() else t for t in inputs]
            truth = _execute(case, "reference", inputs64, up)
            ref_err = reference_errors(lambda *a: _execute(case, "reference", list(a), up), inputs64, case.dtype,
                                       samples=samples, generator=gen)
    except Exception as e:  # e.g. out of memory at a benchmark size: nothing checked, so no row passes
        for row in rows:
            row.failure = f"the reference could not run: {type(e).__name__}: {_first_line(e)}"[:300]
        return rows
    names = case.all_outputs
    for row in rows:
        backend = row.backend
        try:
            first = _execute(case, backend, inputs, up)
            second = _execute(case, backend, inputs, up)
        except Exception as e:  # a backend that raises on valid input fails its row; the run goes on
            row.failure = f"{type(e).__name__}: {_first_line(e)}"[:300]
            continue
        row.deterministic = all(_bitwise_equal(a, b) for a, b in zip(first, second))
        problems, worst_ratio = [], -1.0
        for j, (name, out, w) in enumerate(zip(names, first, want)):
            if out.shape != w.shape or out.dtype != w.dtype:
                problems.append(f"{name}: {tuple(out.shape)} {out.dtype}, expected {tuple(w.shape)} "
                                f"{w.dtype}")
                continue
            if name in case.exact:
                n = _mismatches(out, w)
                row.mismatches += n
                if n:
                    problems.append(f"{name}: {n} of {w.numel()} elements differ from the reference")
                continue
            err, tol = rel_err(out, truth[j]), tolerance(ref_err[j], out.dtype)
            ratio = err / tol
            if ratio > worst_ratio:
                worst_ratio, row.error, row.tolerance, row.worst = ratio, err, tol, name
            if not err <= tol:
                problems.append(f"{name}: error {_g(err)} > tolerance {_g(tol)} (reference error "
                                f"{_g(ref_err[j])})")
        row.agrees = not problems
        if not row.deterministic:
            differ = [n for n, a, b in zip(names, first, second) if not _bitwise_equal(a, b)]
            problems.append(f"two runs differ in {', '.join(differ)}")
        row.failure = "; ".join(problems) or None
    return rows


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""


def _cuda_seconds(fn, reps: int, warmup: int = 3) -> float:
    """Median seconds of fn() over reps calls, each between two CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _copy_bandwidth(device: torch.device) -> float:
    """Device copy bandwidth in bytes/s (bytes read plus written) of a 256 MiB copy, measured in this run."""
    n = 1 << 28
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return 2 * n / _cuda_seconds(lambda: dst.copy_(src), reps=20)


def _timing_inputs(case: _Case, device: torch.device, seed: int):
    gen = torch.Generator(device=device).manual_seed(_seed(case, seed))
    return case.make(gen, device), _Upstream(_seed(case, seed) + 1)  # the correctness pass's inputs


def _seconds(case: _Case, impl: str, inputs: list, up: _Upstream, compiled=None) -> float:
    leaves, forward = _bind(case, impl, inputs, compiled)
    return _cuda_seconds(lambda: _step(leaves, forward, up), 20 if case.tier == "bench" else 10)


def _time_case(case: _Case, rows: list, device: torch.device, seed: int, bw: float) -> None:
    """Fills the time columns of one case's rows: each backend and the eager reference, one forward +
    backward each, and the fraction of the copy bandwidth (bytes: each input read once, each output and
    gradient written once)."""
    inputs, up = _timing_inputs(case, device, seed)
    try:
        eager = _seconds(case, "reference", inputs, up)
    except Exception as e:
        eager = None
        for row in rows:
            row.note = f"eager reference failed: {type(e).__name__}: {e}"[:200]
    out_bytes = sum(t.numel() * t.element_size() for t in _execute(case, "reference", inputs, up))
    in_bytes = sum(v.numel() * v.element_size()
                   for v in (case.views[i](t) if i in case.views else t for i, t in enumerate(inputs)))
    for row in rows:
        if row.deterministic is None:  # the backend raised: nothing to time
            continue
        try:
            s = _seconds(case, row.backend, inputs, up)
        except Exception as e:
            row.note = f"timing failed: {type(e).__name__}: {e}"[:200]
            continue
        row.ms, row.bytes = s * 1e3, in_bytes + out_bytes
        row.frac_copy_bw = row.bytes / s / bw
        if eager:
            row.eager_ms, row.vs_eager = eager * 1e3, eager / s


def _time_compiled(case: _Case, rows: list, device: torch.device, seed: int) -> None:
    """torch.compile of the reference, against each timed row of the case."""
    inputs, up = _timing_inputs(case, device, seed)
    try:
        compiled = _seconds(case, "compile", inputs, up, torch.compile(case.ref, dynamic=False))
    except Exception as e:  # the baseline failing to compile is not the backend's fault
        for row in rows:
            row.note = f"torch.compile of the reference failed: {type(e).__name__}: {_first_line(e)}"[:200]
        return
    for row in rows:
        if row.ms is not None:
            row.compile_ms, row.vs_compile = compiled * 1e3, compiled / (row.ms / 1e3)


def selftest(device=None, quick: bool = False, json_path=None, *, ops: Sequence[str] | None = None,
             timing_budget: float | None = None, progress: bool | None = None,
             seed: int = 0) -> SelftestResult:
    """Check every op on every backend available on `device` against fastcascade.reference.

    Args:
        device: "cpu", "cuda" or "cuda:N" (default: cuda when visible, else cpu).
        quick: the CI run: small and awkward shapes, fewer dtypes, no torch.compile timing; without a GPU it
            sets TRITON_INTERPRET=1 for this process so the Triton kernels run under the interpreter.
        json_path: also write the result as JSON there (atomically, after every row).
        ops: check only these ops (names as in the table, e.g. ["sigmoid_focal", "vote"]).
        timing_budget: seconds from the start after which no further timing starts (CUDA); the correctness
            rows always run, untimed rows show "-". For a run that must fit a time slot.
        progress: a tqdm bar on stderr (default: when stderr is a terminal).
        seed: inputs are drawn from generators seeded by (op, shape, dtype) and this.
    Returns a SelftestResult: print() it for the table; .ok, .failures, .to_dict().
    """
    t0 = time.perf_counter()
    dev = _resolve_device(device)
    path = None
    if json_path is not None:
        path = pathlib.Path(json_path)
        if path.is_dir():
            raise ValueError(f"json_path {str(path)!r} is a folder; give a file path")
        if not path.parent.is_dir():
            raise ValueError(f"json_path {str(path)!r}: the folder {str(path.parent)!r} does not exist")
    cases = _cases(quick, dev)
    if timing_budget is not None and not timing_budget >= 0:
        raise ValueError(f"timing_budget must be a number of seconds >= 0, got {timing_budget!r}")
    if ops is not None:
        ops = [ops] if isinstance(ops, str) else list(ops)
        known = sorted({c.op for c in _cases(False, torch.device("cpu"))})
        unknown = [o for o in ops if o not in known]
        if unknown:
            raise ValueError(f"unknown op(s) {unknown}; the ops are {known}")
        cases = [c for c in cases if c.op in ops]
    backends, skipped = _backends(dev, quick)
    if "triton" in backends:
        _ops.load_triton_ops()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (_cpu_name() or "cpu")
    result = SelftestResult(str(dev), name, quick, backends, skipped, [], _environment(dev))

    def save():
        result.elapsed_s = time.perf_counter() - t0
        if path is not None:
            _write_json_atomic(result.to_dict(), path)

    from tqdm.auto import tqdm

    timed = dev.type == "cuda"
    compiled = [c for c in cases if c.tier == "bench"] if timed else []  # compile costs seconds per shape
    bar = tqdm(total=len(cases) * (2 if timed else 1) + len(compiled), desc="selftest", unit="case",
               file=sys.stderr, disable=None if progress is None else not progress)
    per_case = []
    on_device = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    with on_device, warnings.catch_warnings():
        # the interpreter evaluates inf - inf on the NaN / inf rows the routing cases hold on purpose
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton")
        for case in cases:
            bar.set_postfix_str(case.key, refresh=False)
            rows = _check_case(case, backends, dev, seed, samples=2 if case.tier == "bench" else 4)
            result.rows += rows
            per_case.append((case, rows))
            for r in rows:
                if not r.ok:
                    tqdm.write(f"FAIL {r.op} {r.backend} {r.shape} {r.dtype}: {r.failure}", file=sys.stderr)
            save()
            bar.update()
        if timed:
            result.copy_bandwidth_gbps = _copy_bandwidth(dev) / 1e9
            # every row's time first, then torch.compile of the reference at the benchmark shapes
            work = [(c, rows, False) for c, rows in per_case] + [(c, rows, True) for c, rows in per_case
                                                                  if c.tier == "bench"]
            for case, rows, with_compile in work:
                if timing_budget is not None and time.perf_counter() - t0 > timing_budget:
                    result.timing_cut = True
                    bar.update()
                    continue
                bar.set_postfix_str(("compile " if with_compile else "time ") + case.key, refresh=False)
                try:
                    if with_compile:
                        _time_compiled(case, rows, dev, seed)
                    else:
                        _time_case(case, rows, dev, seed, result.copy_bandwidth_gbps * 1e9)
                except Exception as e:  # e.g. out of memory: the times stay "-", correctness is unaffected
                    for row in rows:
                        row.note = f"timing failed: {type(e).__name__}: {_first_line(e)}"[:200]
                save()
                bar.update()
    bar.close()
    result.complete = True
    save()
    return result


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------------
# command line (python -m fastcascade selftest)


def add_arguments(parser) -> None:
    """The selftest subcommand's flags, on an argparse parser."""
    parser.add_argument("--quick", action="store_true",
                        help="CI-sized run: small and awkward shapes, fewer dtypes, no torch.compile timing; "
                             "without a GPU the Triton kernels run under the interpreter")
    parser.add_argument("--json", dest="json_path", metavar="PATH", default=None,
                        help="also write the results as JSON to PATH (rewritten atomically after every row)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda when visible, else cpu)")
    parser.add_argument("--timing-budget", type=float, default=None, metavar="SECONDS",
                        help="start no further timing after SECONDS from the start (the correctness rows "
                             "always run): for a run that must fit a time slot")


def run_cli(args) -> int:
    """Runs the selftest for parsed arguments: prints the table; 0 when every row passes, 1 when any backend
    disagrees with the reference or is nondeterministic, 2 for bad arguments."""
    try:
        result = selftest(device=args.device, quick=args.quick, json_path=args.json_path,
                          timing_budget=args.timing_budget)
    except ValueError as e:
        print(f"python -m fastcascade selftest: error: {e}", file=sys.stderr)
        return 2
    print(result)
    return 0 if result.ok else 1
