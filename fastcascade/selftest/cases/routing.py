"""Case table of the routing family (route_threshold, route_argmax, route_confident, partition,
gather_rows, scatter_rows, vote): the sizes and row layouts the tests, the self-test and the sm_90
compile gate draw."""

from __future__ import annotations

import torch

from ... import reference
from .common import EDGE_SIZES, I32, Case, GateCase, Meta, public_api, randint, randn, with_specials

f16, bf16, f32, f64, i32, i64 = torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64

FLOATS = (f16, bf16, f32, f64)  # the tests' logit dtypes
SIZES = (0,) + EDGE_SIZES  # the tests' row counts: empty, one, fewer than a block, one past a block
# the tests' gather / scatter rows (shape, dtype): 1 KiB fp16 rows (16-byte words), odd byte rows, scalars
# per row, empty rows
ROW_CASES = (
    ((37, 512), f16), ((9, 3, 5), bf16), ((11,), f32), ((6, 0), f32), ((8, 3), i64), ((13, 7), torch.int8),
    ((5, 4), torch.bool), ((4, 3), torch.complex64), ((0, 4), f32), ((1, 4), f64))


# ---------------------------------------------------------------------------------------------
# self-test


def _decision_cases(dtypes, tiers):
    out = []

    def threshold(tier, shape, dtype, view=None, label=None):
        def make(gen, device):
            return [with_specials(randn(gen, device, shape, dtype, 3.0))]

        return Case("route_threshold", tier, label or "x".join(map(str, shape)), dtype, make,
                     lambda b, x: public_api().route_threshold(x, 0.3, 1.5, backend=b),
                     lambda x: reference.route_threshold(x, 0.3, 1.5), ("logits",), ("branch",),
                     exact=frozenset({"branch"}), views={0: view} if view else {})

    def rowwise(op, tier, shape, dtype, transposed=False):
        base = shape[::-1] if transposed else shape

        def make(gen, device):
            return [with_specials(randn(gen, device, base, dtype, 3.0))]

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
            return [randint(gen, device, nb, (n,), idtype)]

        return Case("partition", tier, f"{n} B={nb} {str(idtype)[6:]}", torch.int64, make,
                     lambda b, br: tuple(public_api().partition(br, nb, backend=b)),
                     lambda br: reference.partition(br, nb), ("branch",), ("order", "counts", "offsets"),
                     exact=frozenset({"order", "counts", "offsets"}))

    def gather(tier, shape, m, dtype, idtype=torch.int64):
        def make(gen, device):
            x = randn(gen, device, shape, dtype)
            return [x, torch.randperm(shape[0], generator=gen, device=device)[:m].to(idtype)]

        return Case("gather_rows", tier, f"{'x'.join(map(str, shape))} M={m}", dtype, make,
                     lambda b, x, i: public_api().gather_rows(x, i, backend=b), reference.gather_rows, ("x", "index"),
                     ("y",), diff=(0,), exact=frozenset({"y", "grad x"}))

    def scatter(tier, shape, rows, dtype, idtype=torch.int64):
        def make(gen, device):
            src = randn(gen, device, shape, dtype)
            return [src, torch.randperm(rows, generator=gen, device=device)[:shape[0]].to(idtype)]

        return Case("scatter_rows", tier, f"{'x'.join(map(str, shape))} R={rows}", dtype, make,
                     lambda b, s, i: public_api().scatter_rows(s, i, rows, backend=b),
                     lambda s, i: reference.scatter_rows(s, i, rows), ("src", "index"), ("y",), diff=(0,),
                     exact=frozenset({"y", "grad src"}))

    def vote(tier, shape, mode, dtype):
        def make(gen, device):
            return [randn(gen, device, shape, dtype, 2.0)]

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


def selftest_cases(dtypes, tiers, quick=False) -> list:
    return _decision_cases(dtypes, tiers) + _routing_cases(dtypes, tiers)


# ---------------------------------------------------------------------------------------------
# sm_90 compile gate: the cascade's shapes (B = 8192 rows, 2/3/4 classes, 3 ensemble members) and edges


GATE = [
    GateCase("route-threshold-8192-fp32", "route_threshold_triton", (Meta((8192,)), 0.3), bench=True),
    GateCase("route-threshold-n1-bf16", "route_threshold_triton", (Meta((1, 1), bf16), 0.3)),
    GateCase("route-threshold-fp64", "route_threshold_triton", (Meta((77,), f64), 0.3)),
    GateCase("route-argmax-8192x3-fp32", "route_argmax_triton", (Meta((8192, 3)),), bench=True),
    GateCase("route-argmax-C1-n1-fp64", "route_argmax_triton", (Meta((1, 1), f64),)),
    GateCase("route-argmax-C5000-fp16", "route_argmax_triton", (Meta((9, 5000), f16),)),
    GateCase("route-confident-8192x3-fp32", "route_confident_triton", (Meta((8192, 3)), 1.0, 1.25), bench=True),
    GateCase("route-confident-8192x4-fp64", "route_confident_triton", (Meta((8192, 4), f64), 1.0, 1.25),
             bench=True),
    GateCase("route-confident-C1-n1-bf16", "route_confident_triton", (Meta((1, 1), bf16), 0.5, 1.0)),
    GateCase("route-confident-C5000-fp64", "route_confident_triton", (Meta((9, 5000), f64), 2.0, 1.5),
             bench=True),
    GateCase("partition-1M-3", "partition_triton", (Meta((1 << 20,), i64), 3), bench=True),
    GateCase("partition-n1-B1-int32", "partition_triton", (Meta((1,), i32), 1)),
    GateCase("partition-B63", "partition_triton", (Meta((5000,), i64), 63)),
    GateCase("gather-1M-x512-fp16", "gather_rows_triton", (Meta((1 << 20, 512), f16), Meta((1 << 20,), i64)),
             bench=True),
    GateCase("scatter-1M-x512-fp16", "scatter_rows_triton",
             (Meta((1 << 20, 512), f16), Meta((1 << 20,), i64), 1 << 20), bench=True),
    GateCase("gather-M1-bytes-int32-index", "gather_rows_triton", (Meta((3, 1), torch.uint8), Meta((1,), i32))),
    GateCase("gather-int16-words", "gather_rows_triton", (Meta((4, 3), f16), Meta((5,), i64))),
    GateCase("scatter-huge-rows", "scatter_rows_triton", (Meta((2, 1 << 27), f64), Meta((2,), i64), 3)),
    GateCase("vote-8192-K3-C4-hard", "vote_triton", (Meta((3, 8192, 4)), 0, False), bench=True),
    GateCase("vote-8192-K3-C4-soft-probs", "vote_triton", (Meta((3, 8192, 4)), 1, True), bench=True),
    GateCase("vote-K1-N1-C1-fp64", "vote_triton", (Meta((1, 1, 1), f64), 0, True)),
    GateCase("vote-C4096-fp64", "vote_triton", (Meta((3, 5, 4096), f64), 0, True)),
    GateCase("vote-KN-over-2^31", "vote_triton", (Meta((3, I32 // 2, 2), bf16), 1, True)),
]
