"""Metrics: confusion matrix of N predictions against N targets, C = 8 and C = 16.

fastcascade confusion_matrix (one pass over pred and target, per-block histograms, no host sync)
against torch.bincount(target * C + pred, minlength=C * C) (an index kernel, then a bincount that
reads the indices back and syncs to size its output), eager and under torch.compile. Bytes counted:
the fewest any method must move, read pred and target once (int64 each); the C x C output is noise.

Run: pytest bench/test_bench_metrics.py --benchmark-only  (bench/metrics_notes.md has the floors)
"""

import pytest
import torch
from bench_utils import DEVICE, fused_backends, record

import fastcascade as fc

N = (1 << 24) if DEVICE == "cuda" else (1 << 22)  # 16M on a GPU; 4M on the 2-core CPU
CLASSES = [8, 16]



def _bincount(pred, target, C):
    return torch.bincount(target * C + pred, minlength=C * C).view(C, C)


_compiled_bincount = torch.compile(_bincount)
_compiled_fc = {b: torch.compile(lambda p, t, C, b=b: fc.confusion_matrix(p, t, C, backend=b), fullgraph=True)
                for b in fused_backends()}


def _impls():
    impls = {"bincount-eager": _bincount, "bincount-compile": _compiled_bincount}
    for b in fused_backends():
        impls[f"fastcascade-{b}"] = lambda p, t, C, b=b: fc.confusion_matrix(p, t, C, backend=b)
        impls[f"fastcascade-{b}-compile"] = _compiled_fc[b]
    return impls


@pytest.mark.parametrize("impl", list(_impls()))
@pytest.mark.parametrize("C", CLASSES)
def test_confusion_matrix(benchmark, impl, C):
    benchmark.group = f"confusion matrix N={N} C={C} int64"
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, C, (N,), generator=gen).to(DEVICE)
    pred = torch.where(torch.rand(N, generator=gen) < 0.7, target.cpu(), torch.randint(0, C, (N,), generator=gen))
    pred = pred.to(DEVICE)
    fn = _impls()[impl]
    assert torch.equal(fn(pred, target, C), _bincount(pred, target, C))  # warm up and check once
    record(benchmark, lambda: fn(pred, target, C), 2 * N * pred.element_size())
