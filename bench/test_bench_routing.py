"""Routing: split N rows x 512 fp16 into 3 branches by a per-row branch id.

fastcascade: partition (stable counting sort, no host sync) + gather_rows into branch-contiguous
order, then one transfer of the 4 offsets so each branch is a view; against boolean-mask indexing
(x[branch == b] for each b: a nonzero() and a host sync per branch), a stable argsort + index_select,
and torch.compile of each. Bytes counted: the fewest any split must move: read x and the ids, write
the rows (and the int64 order of the sorting methods is not counted).

Run: pytest bench/test_bench_routing.py --benchmark-only  (bench/routing_notes.md has the floors)
At a given intra-op thread count (the CPU requirement is checked at 1 and 2):
    FASTCASCADE_BENCH_THREADS=1 pytest bench/test_bench_routing.py --benchmark-only
On a shared machine, bench/routing_threads.py times mask-eager and fastcascade in turns at 1 and 2
threads and prints their medians (one implementation after another can land in a quiet and a busy minute).
"""

import pytest
import torch
from bench_utils import DEVICE, fused_backends, record

import fastcascade as fc

ROWS = [1 << 16, 1 << 20] if DEVICE == "cuda" else [1 << 14, 1 << 16]  # 1M x 1 KiB = 1 GiB on a GPU
D = 512
BRANCHES = 3


def _mask_split(x, branch):
    return [x[branch == b] for b in range(BRANCHES)]


def _argsort_sorted(x, branch):
    order = torch.argsort(branch, stable=True)
    return x.index_select(0, order), torch.bincount(branch, minlength=BRANCHES)


def _fc_sorted(x, branch, backend):
    order, counts, offsets = fc.partition(branch, BRANCHES, backend=backend)
    return fc.gather_rows(x, order, backend=backend), offsets


def _views(x_sorted, offsets):
    bounds = offsets.tolist()  # the one host transfer of a cascade level
    return [x_sorted[bounds[b]:bounds[b + 1]] for b in range(BRANCHES)]


_compiled_mask = torch.compile(_mask_split)
_compiled_argsort = torch.compile(_argsort_sorted)
_compiled_fc = {b: torch.compile(lambda x, br, b=b: _fc_sorted(x, br, b), fullgraph=True) for b in fused_backends()}


def _impls():
    impls = {
        "mask-eager": _mask_split,
        "mask-compile": _compiled_mask,
        "argsort-eager": lambda x, br: _views(*_argsort_sorted_offsets(x, br, _argsort_sorted)),
        "argsort-compile": lambda x, br: _views(*_argsort_sorted_offsets(x, br, _compiled_argsort)),
    }
    for b in fused_backends():
        impls[f"fastcascade-{b}"] = lambda x, br, b=b: _views(*_fc_sorted(x, br, b))
        impls[f"fastcascade-{b}-compile"] = lambda x, br, b=b: _views(*_compiled_fc[b](x, br))
    return impls


def _argsort_sorted_offsets(x, branch, fn):
    xs, counts = fn(x, branch)
    return xs, torch.cat([counts.new_zeros(1), counts.cumsum(0)])


@pytest.mark.parametrize("impl", list(_impls()))
@pytest.mark.parametrize("n", ROWS)
def test_partition_gather_3_branches(benchmark, impl, n):
    benchmark.group = f"split {n} rows x {D} fp16 into {BRANCHES} branches"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, D, generator=gen).to(device=DEVICE, dtype=torch.float16)
    branch = torch.randint(0, BRANCHES, (n,), generator=gen, dtype=torch.int32).to(DEVICE)
    fn = _impls()[impl]
    parts = fn(x, branch)  # warm up compilation and check the split once
    want = _mask_split(x, branch)
    assert all(torch.equal(a, b) for a, b in zip(parts, want))
    record(benchmark, lambda: fn(x, branch), 2 * n * D * x.element_size() + n * branch.element_size())
