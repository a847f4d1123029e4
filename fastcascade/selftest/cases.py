"""The self-test's cases: for every op, random inputs at small, awkward and benchmark-sized shapes, the
function under test (one per backend) and its reference."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from .. import reference

# ---------------------------------------------------------------------------------------------
# the cases: one op at one shape and dtype, with its inputs, public call and reference


@dataclasses.dataclass
class Case:
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
        return f"{self.op} {self.shape} {DTYPE_NAMES[self.dtype]}"

    @property
    def all_outputs(self) -> list:
        return list(self.outputs) + [f"grad {self.names[i]}" for i in self.diff]

    @property
    def float_outputs(self) -> bool:
        return any(n not in self.exact for n in self.all_outputs)


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
                torch.int64: "int64", torch.int32: "int32", torch.uint8: "uint8"}


def _randn(gen, device, shape, dtype, scale=1.0):
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)


def _randint(gen, device, high, shape, dtype=torch.int64):
    return torch.randint(0, high, shape, generator=gen, device=device).to(dtype)


def public_api():
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

        return Case("sigmoid_focal", tier, label or f"{'x'.join(map(str, shape))} {reduction}", dtype, make,
                     lambda b, x, t: public_api().sigmoid_focal_loss(x, t, alpha, gamma, reduction, eps, backend=b),
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
            return public_api().softmax_focal_loss(x, t, gamma, w, ignore, eps, reduction, backend=b)

        def ref(*args):
            x, t, w = split(args)
            return reference.softmax_focal_loss(x, t, gamma, w, ignore, eps, reduction)

        label = "x".join(map(str, shape)) + (" nhwc" if channels_last else "") + f" {reduction}"
        return Case("softmax_focal", tier, label, dtype, make, public, ref,
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
            return public_api().dice_focal_loss(x, t, w, backend=b, **kw)

        def ref(x, t, w=None):
            return reference.dice_focal_loss(x, t, w, **kw)

        label = "x".join(map(str, shape)) + (" nhwc" if channels_last else "")
        if ignore is not None or not include_background or not batch_dice:
            label += " per-image" if not batch_dice else " options"
        return Case("dice_focal", tier, label, dtype, make, public, ref,
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
            return public_api().ResidualAdapter(C, r, kind, act, backend=b, device=device)

        def ref(x, dw, db, uw, ub):
            if kind == "pooled":
                return reference.pooled_adapter(x, dw, db, uw, ub, act)
            return reference.pixel_adapter(x, dw, db, uw, ub, act, channel_dim=1 if x.dim() == 4 else -1)

        label = "x".join(map(str, shape)) + (" nhwc" if channels_last else "") + f" r={r} {act}"
        return Case(op, tier, label, dtype, make, None, ref, ("x", "down_w", "down_b", "up_w", "up_b"),
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

        return Case("route_threshold", tier, label or "x".join(map(str, shape)), dtype, make,
                     lambda b, x: public_api().route_threshold(x, 0.3, 1.5, backend=b),
                     lambda x: reference.route_threshold(x, 0.3, 1.5), ("logits",), ("branch",),
                     exact=frozenset({"branch"}), views={0: view} if view else {})

    def rowwise(op, tier, shape, dtype, transposed=False):
        base = shape[::-1] if transposed else shape

        def make(gen, device):
            return [_with_specials(_randn(gen, device, base, dtype, 3.0))]

        if op == "route_argmax":
            public, ref = (lambda b, x: public_api().route_argmax(x, backend=b)), reference.route_argmax
        else:
            public = lambda b, x: public_api().route_confident(x, 0.6, 1.5, backend=b)  # noqa: E731
            ref = lambda x: reference.route_confident(x, 0.6, 1.5)  # noqa: E731
        label = "x".join(map(str, shape)) + (" transposed" if transposed else "")
        return Case(op, tier, label, dtype, make, public, ref, ("logits",), ("branch",),
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

        return Case("partition", tier, f"{n} B={nb} {str(idtype)[6:]}", torch.int64, make,
                     lambda b, br: tuple(public_api().partition(br, nb, backend=b)),
                     lambda br: reference.partition(br, nb), ("branch",), ("order", "counts", "offsets"),
                     exact=frozenset({"order", "counts", "offsets"}))

    def gather(tier, shape, m, dtype, idtype=torch.int64):
        def make(gen, device):
            x = _randn(gen, device, shape, dtype)
            return [x, torch.randperm(shape[0], generator=gen, device=device)[:m].to(idtype)]

        return Case("gather_rows", tier, f"{'x'.join(map(str, shape))} M={m}", dtype, make,
                     lambda b, x, i: public_api().gather_rows(x, i, backend=b), reference.gather_rows, ("x", "index"),
                     ("y",), diff=(0,), exact=frozenset({"y", "grad x"}))

    def scatter(tier, shape, rows, dtype, idtype=torch.int64):
        def make(gen, device):
            src = _randn(gen, device, shape, dtype)
            return [src, torch.randperm(rows, generator=gen, device=device)[:shape[0]].to(idtype)]

        return Case("scatter_rows", tier, f"{'x'.join(map(str, shape))} R={rows}", dtype, make,
                     lambda b, s, i: public_api().scatter_rows(s, i, rows, backend=b),
                     lambda s, i: reference.scatter_rows(s, i, rows), ("src", "index"), ("y",), diff=(0,),
                     exact=frozenset({"y", "grad src"}))

    def vote(tier, shape, mode, dtype):
        def make(gen, device):
            return [_randn(gen, device, shape, dtype, 2.0)]

        return Case("vote", tier, f"{'x'.join(map(str, shape))} {mode}", dtype, make,
                     lambda b, x: public_api().vote(x, mode, return_probs=True, backend=b),
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
        return Case("confusion_matrix", tier, label, torch.int64, make,
                     lambda b, p, t: public_api().confusion_matrix(p, t, C, ignore, backend=b),
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


def all_cases(quick: bool, device: torch.device) -> list:
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
