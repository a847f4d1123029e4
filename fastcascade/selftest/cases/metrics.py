"""Case table of the metrics family (confusion_matrix): the sizes and class counts the tests, the
self-test and the sm_90 compile gate draw."""

from __future__ import annotations

import torch

from ... import reference
from .common import Case, GateCase, Meta, public_api, randint

i32, i64 = torch.int32, torch.int64

# the tests' (pred, target) dtypes and (N, C): empty, one, few, one past a block, classes up to 32 (Triton
# keeps the matrix in registers) and past it (atomics)
DTYPE_PAIRS = ((i64, i64), (i32, i64), (i64, i32), (i32, i32))
SIZES = ((0, 3), (1, 1), (7, 3), (4097, 8), (3000, 16), (1000, 32), (2000, 70))
CPU_CHUNKED = (140000, 5)  # several CPU chunks (not under the Triton interpreter: too slow there)


# ---------------------------------------------------------------------------------------------
# self-test


def _confusion_cases(tiers):
    def case(tier, shape, C, ignore=None, idtype=torch.int64, view=None, label=None):
        def make(gen, device):
            pred = randint(gen, device, C, shape, idtype)
            target = randint(gen, device, C, shape, idtype)
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


def selftest_cases(dtypes, tiers, quick=False) -> list:
    return _confusion_cases(tiers)


# ---------------------------------------------------------------------------------------------
# sm_90 compile gate


GATE = [
    GateCase("confusion-16M-C8", "confusion_matrix_triton", (Meta((1 << 24,), i64), Meta((1 << 24,), i64), 8, None),
             bench=True),
    GateCase("confusion-16M-C16", "confusion_matrix_triton",
             (Meta((1 << 24,), i64), Meta((1 << 24,), i64), 16, -1), bench=True),
    GateCase("confusion-n1-C1-ignore1-int32", "confusion_matrix_triton", (Meta((1,), i32), Meta((1,), i32), 1, 1)),
    GateCase("confusion-C32", "confusion_matrix_triton", (Meta((999,), i64), Meta((999,), i64), 32, None)),
    GateCase("confusion-C33-atomic", "confusion_matrix_triton", (Meta((999,), i32), Meta((999,), i64), 33, 1)),
]
