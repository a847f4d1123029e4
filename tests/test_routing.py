"""Routing ops: every backend against fastcascade.reference (decisions and partitions exactly),
properties that do not lean on the reference, gradients, opcheck, torch.compile, determinism, bad input."""

import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import backend_params, fused_backend_params, seeded

import fastcascade as fc
from fastcascade import _ops, reference
from fastcascade.selftest.cases import routing as table

BACKENDS = backend_params()
FUSED = fused_backend_params()
CPU_BACKENDS = [p for p in BACKENDS if p.values[1] == "cpu"]
INTERPRETED_AOT = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                     reason="AOT tracing of Triton kernels needs a GPU (not the interpreter)")
FLOATS = list(table.FLOATS)
SIZES = list(table.SIZES)


def _on(device, *ts):
    return [t.to(device) for t in ts]


# ---------------------------------------------------------------------------------------------
# route_threshold


def _near_cut(cut: float, dtype: torch.dtype) -> torch.Tensor:
    """The dtype's values around the cut (the ones an inexact comparison gets wrong), plus specials."""
    specials = [math.inf, -math.inf, math.nan, 0.0]
    if not math.isfinite(cut):
        return torch.tensor(specials, dtype=dtype)
    c = torch.tensor(cut, dtype=torch.float64).to(dtype)
    vals = [c]
    lo = hi = c
    for _ in range(3):
        lo = torch.nextafter(lo.float(), torch.tensor(-math.inf)).to(dtype) if dtype != torch.float64 else \
            torch.nextafter(lo, torch.tensor(-math.inf, dtype=dtype))
        hi = torch.nextafter(hi.float(), torch.tensor(math.inf)).to(dtype) if dtype != torch.float64 else \
            torch.nextafter(hi, torch.tensor(math.inf, dtype=dtype))
        vals += [lo, hi]
    if dtype in (torch.float16, torch.bfloat16):  # nextafter in fp32 may round back: step by the dtype's ulp
        ulp = torch.finfo(dtype).eps * max(abs(cut), torch.finfo(dtype).tiny)
        vals += [(c.double() + k * ulp).to(dtype) for k in (-2, -1, 1, 2)]
    return torch.cat([torch.stack(vals).to(dtype), torch.tensor(specials, dtype=dtype)])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_route_threshold_is_exact(backend, device, dtype):
    gen = seeded("threshold", dtype)
    for threshold in [0.0, 1e-9, 0.3, 0.5, 0.999, 1 - 1e-12, 1.0]:
        for temperature in [1.0, 0.7, 3.0]:
            cut = reference.logit_threshold(threshold, temperature)
            for n in SIZES:
                x = (torch.randn(n, generator=gen, dtype=torch.float64) * 4).to(dtype)
                x = torch.cat([x, _near_cut(cut, dtype)]) if n else x
                out = fc.route_threshold(x.to(device), threshold, temperature, backend=backend)
                assert out.dtype == torch.int32 and out.shape == x.shape
                want = reference.route_threshold(x, threshold, temperature)
                assert torch.equal(out.cpu(), want), (threshold, temperature, n)
                # the semantics: x > cut exactly, and sigmoid(x / T) > t away from the cut
                exact = np.array([v > cut for v in x.double().tolist()], dtype=np.int32)
                assert np.array_equal(out.cpu().numpy(), exact)
                far = (x.double() - cut).abs() > 1e-6 * (1 + abs(cut)) if math.isfinite(cut) else x == x
                far &= torch.isfinite(x)
                sig = (torch.sigmoid(x.double() / temperature) > threshold).int()
                assert torch.equal(out.cpu()[far], sig[far])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_route_threshold_edges_send_everything_to_one_branch(backend, device):
    x = (torch.randn(33, generator=seeded("edges")) * 50).to(device)
    assert fc.route_threshold(x, 0.0, backend=backend).eq(1).all()
    assert fc.route_threshold(x, 1.0, backend=backend).eq(0).all()
    col = x[:, None]  # (N, 1), and a strided view of it
    assert torch.equal(fc.route_threshold(col, 0.4, backend=backend), fc.route_threshold(x, 0.4, backend=backend))
    wide = torch.stack([x, -x], 1)
    assert torch.equal(fc.route_threshold(wide[:, :1], 0.4, backend=backend).cpu(),
                       reference.route_threshold(x.cpu(), 0.4))


# ---------------------------------------------------------------------------------------------
# route_argmax, route_confident


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
def test_route_argmax_is_torch_argmax(backend, device, dtype):
    gen = seeded("argmax", dtype)
    for n, C in [(0, 3), (1, 1), (7, 3), (513, 10), (3, 5000)]:
        x = torch.randint(-2, 3, (n, C), generator=gen).to(dtype)  # small integers: many ties
        if n > 2:
            x[1, C // 2] = math.nan
            x[2, :] = -math.inf
        out = fc.route_argmax(x.to(device), backend=backend)
        assert out.dtype == torch.int32
        assert torch.equal(out.cpu(), torch.argmax(x, dim=1).int()), (n, C)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_route_confident_matches_reference(backend, device, dtype):
    gen = seeded("confident", dtype)
    for n, C in [(0, 3), (1, 1), (7, 3), (1000, 4), (5, 5000)]:
        x = (torch.randn(n, C, generator=gen, dtype=torch.float64) * 3).to(dtype)
        if n > 3:
            x[1, 0], x[2, -1], x[3, :] = math.nan, math.inf, -math.inf
        for tau in [0.0, 0.3, 0.6, 0.95, 1.0]:
            for temperature in [1.0, 2.5]:
                out = fc.route_confident(x.to(device), tau, temperature, backend=backend)
                assert out.dtype == torch.int32 and out.shape == (n,)
                want = reference.route_confident(x, tau, temperature)
                assert torch.equal(out.cpu(), want), (n, C, tau, temperature)
                p = torch.softmax(x.double() / temperature, dim=1).amax(dim=1)
                finite = torch.isfinite(x).all(dim=1) & ((p - tau).abs() > 1e-9)
                assert torch.equal(out.cpu()[finite], (p >= tau).int()[finite])
                if n > 3:
                    assert out[1] == 0 and out[2] == 0 and out[3] == 0  # NaN, +inf and all -inf rows continue
    x = torch.randn(9, 4, generator=gen).to(device)
    assert fc.route_confident(x, 0.0, backend=backend).eq(1).all()
    assert fc.route_confident(torch.zeros(9, 4, device=device), 1.0, backend=backend).eq(0).all()


# ---------------------------------------------------------------------------------------------
# partition


def _check_partition_properties(branch, B, order, counts, offsets):
    """What a stable partition is, without the reference."""
    N = branch.numel()
    assert order.dtype == counts.dtype == offsets.dtype == torch.int64
    assert order.shape == (N,) and counts.shape == (B,) and offsets.shape == (B + 1,)
    assert torch.equal(torch.sort(order).values, torch.arange(N))  # a permutation
    assert offsets[0] == 0 and torch.equal(offsets[1:] - offsets[:-1], counts)
    for b in range(B):
        seg = order[offsets[b]:offsets[b + 1]]
        assert (branch[seg] == b).all() and (seg[1:] > seg[:-1]).all()  # its rows, in index order
    rest = order[offsets[B]:]
    assert ((branch[rest] < 0) | (branch[rest] >= B)).all() and (rest[1:] > rest[:-1]).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=str)
def test_partition_is_a_stable_counting_sort(backend, device, dtype):
    gen = seeded("partition", dtype)
    cases = [(n, 3, "random") for n in SIZES] + [
        (64, 1, "random"), (100, 4, "one"), (100, 4, "gaps"), (513, 63, "random"), (513, 64, "random"),
        (300, 200, "random")]
    if backend != "triton":
        cases.append((140000, 3, "random"))  # several CPU chunks
    for n, B, kind in cases:
        branch = torch.randint(0, B, (n,), generator=gen)
        if kind == "one":
            branch.fill_(B - 1)
        elif kind == "gaps":  # empty branches 1 and 3
            branch = branch.remainder(2) * 2
        branch = branch.to(dtype)
        order, counts, offsets = fc.partition(branch.to(device), B, backend=backend)
        order, counts, offsets = order.cpu(), counts.cpu(), offsets.cpu()
        _check_partition_properties(branch, B, order, counts, offsets)
        want = reference.partition(branch, B)
        assert all(torch.equal(a, b) for a, b in zip((order, counts, offsets), want)), (n, B, kind)


@pytest.mark.parametrize("backend,device", [p for p in FUSED if p.values[0] == "triton"])
def test_partition_kernel_drops_out_of_range_ids_as_cuda_does(backend, device):
    """What the device kernels do without FASTCASCADE_CHECK (the API raises first on the CPU)."""
    for B in [3, 100]:
        branch = torch.tensor([2, -1, 0, 3, 0, 1, 7, 2, -5], device=device)
        order, counts, offsets = _ops.op("partition", backend)(branch, B)
        _check_partition_properties(branch.cpu(), B, order.cpu(), counts.cpu(), offsets.cpu())
        want = reference.partition(branch.cpu(), B)
        assert all(torch.equal(a.cpu(), b) for a, b in zip((order, counts, offsets), want))
        if B == 3:
            assert counts.tolist() == [2, 1, 2] and offsets[-1] == 5 and order[5:].tolist() == [1, 3, 6, 8]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_partition_refuses_out_of_range_ids_on_cpu(backend, device):
    if device != "cpu":
        pytest.skip("CUDA drops such rows without a sync (test_gpu_*)")
    for bad in [[0, 3, 1], [0, -1, 1]]:
        with pytest.raises(ValueError, match=r"outside \[0, num_branches = 3\)"):
            fc.partition(torch.tensor(bad), 3, backend=backend)
    with pytest.raises(RuntimeError, match=r"holds 3 at row 1, outside \[0, num_branches = 3\)"):
        torch.ops.fastcascade.partition(torch.tensor([0, 3, 1]), 3)


# ---------------------------------------------------------------------------------------------
# gather_rows / scatter_rows


def _rows(shape, dtype, gen):
    v = torch.randn(shape, generator=gen, dtype=torch.float64) * 50
    if dtype == torch.bool:
        return v > 0
    if dtype == torch.complex64:
        return torch.complex(v.float(), -v.float())
    return v.to(dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_gather_scatter_rows_match_indexing(backend, device, index_dtype):
    gen = seeded("rows", index_dtype)
    for shape, dtype in table.ROW_CASES:
        R = shape[0]
        x = _rows(shape, dtype, gen)
        for src in [x, x[1:] if R > 1 else x, x.transpose(0, 1).contiguous().transpose(0, 1) if x.dim() > 1 else x]:
            R = src.shape[0]  # sliced: a storage offset, so the copy picks narrower words; transposed: strided
            perm = torch.randperm(R, generator=gen)
            sub = perm[: (R + 1) // 2]
            dup = torch.randint(0, R, (2 * R,), generator=gen) if R else perm
            for idx in [perm, sub, dup]:
                idx = idx.to(index_dtype)
                g = fc.gather_rows(src.to(device), idx.to(device), backend=backend)
                assert g.dtype == src.dtype and torch.equal(g.cpu(), src[idx.long()]), (shape, dtype)
            for idx in [perm, sub]:
                idx = idx.to(index_dtype)
                part = src[: idx.numel()]
                s = fc.scatter_rows(part.to(device), idx.to(device), R + 2, backend=backend)
                want = torch.zeros((R + 2,) + tuple(src.shape[1:]), dtype=src.dtype)
                want[idx.long()] = part
                assert torch.equal(s.cpu(), want), (shape, dtype)
    # partition's order round trip: gather then scatter back is the identity
    x = _rows((50, 6), torch.float32, gen).to(device)
    order = fc.partition(torch.randint(0, 3, (50,), generator=gen).to(device), 3, backend=backend).order
    back = fc.scatter_rows(fc.gather_rows(x, order, backend=backend), order, 50, backend=backend)
    assert torch.equal(back, x)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gather_scatter_gradients_are_each_other(backend, device):
    gen = seeded("rows-grad")
    x = torch.randn(10, 3, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    idx = torch.randperm(10, generator=gen)[:6].to(device)
    w = torch.randn(6, 3, 4, generator=gen, dtype=torch.float64).to(device)
    (fc.gather_rows(x, idx, backend=backend) * w).sum().backward()
    want = torch.zeros(10, 3, 4, dtype=torch.float64)
    want[idx.cpu()] = w.cpu()
    assert torch.equal(x.grad.cpu(), want)
    src = w.clone().requires_grad_(True)
    g = torch.randn(12, 3, 4, generator=gen, dtype=torch.float64).to(device)
    (fc.scatter_rows(src, idx, 12, backend=backend) * g).sum().backward()
    assert torch.equal(src.grad, g[idx])
    if device == "cpu":
        op = lambda name: _ops.op(name, backend) if backend != "torch" else getattr(reference, name)  # noqa: E731
        assert torch.autograd.gradcheck(lambda a: op("gather_rows")(a, idx), (x.detach().requires_grad_(True),))
        assert torch.autograd.gradcheck(lambda a: op("scatter_rows")(a, idx, 12), (src.detach().requires_grad_(True),))


def test_gather_backward_with_repeated_rows_raises_on_cpu():
    """A repeated gather index would need a summing scatter in the backward: refused, not silently wrong."""
    x = torch.randn(4, 2, requires_grad=True)
    y = fc.gather_rows(x, torch.tensor([0, 2, 0]), backend="cpu")
    assert torch.equal(y.detach(), x.detach()[[0, 2, 0]])
    with pytest.raises(RuntimeError, match="duplicate indices are not supported"):
        y.sum().backward()


def _huge_pages_advisable() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


# In a fresh interpreter: there glibc maps a 32 MiB output afresh. In this long-lived one a large enough
# free chunk of the heap (already mapped, maybe already touched) may serve it instead, and advice cannot
# change pages that are already there.
_FRESH_OUTPUTS_HUGE_KIB = """
import torch, fastcascade as fc

def anon_huge_kib(address):
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            field = line.split()
            if "-" in field[0] and not field[0].endswith(":"):
                lo, hi = (int(v, 16) for v in field[0].split("-"))
                inside = lo <= address < hi
            elif inside and field[0] == "AnonHugePages:":
                return int(field[1])
    return -1

x = torch.ones(16411, 1024, dtype=torch.float16)
idx = torch.arange(16411)
g = fc.gather_rows(x, idx, backend="cpu")
s = fc.scatter_rows(x, idx, 16411, backend="cpu")
assert torch.equal(g, x) and torch.equal(s, x)
# 2 MiB past the start: inside the aligned interior whatever the allocation's offset
print(anon_huge_kib(g.data_ptr() + (2 << 20)), anon_huge_kib(s.data_ptr() + (2 << 20)))
"""


def test_cpu_row_copy_into_a_fresh_mapping():
    """An output of >= 32 MiB (glibc maps each one afresh) gets 2 MiB pages advised on its aligned interior
    before the copy first writes it: the rows land where indexing puts them, in the unaligned head and tail
    too, and where the kernel allows the advice the interior of a fresh mapping is backed by huge pages."""
    gen = seeded("rows-fresh-mapping")
    R, D = 16411, 1024  # fp16: 32.05 MiB, not a whole number of 2 MiB pages
    x = torch.randn(R, D, generator=gen).to(torch.float16)
    perm = torch.randperm(R, generator=gen)
    assert torch.equal(fc.gather_rows(x, perm, backend="cpu"), x[perm])
    half = perm[: R // 2]
    want = torch.zeros_like(x)
    want[half] = x[: R // 2]
    assert torch.equal(fc.scatter_rows(x[: R // 2], half, R, backend="cpu"), want)
    if not (_huge_pages_advisable() and os.path.exists("/proc/self/smaps")):
        pytest.skip("transparent huge pages are off (or not Linux): the advice changes nothing here")
    res = subprocess.run([sys.executable, "-c", _FRESH_OUTPUTS_HUGE_KIB], cwd=pathlib.Path(__file__).parent,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    gather_kib, scatter_kib = map(int, res.stdout.split()[-2:])
    assert gather_kib > 0 and scatter_kib > 0, res.stdout


@pytest.mark.parametrize("backend,device", [p for p in FUSED if p.values[0] == "triton"])
def test_row_kernels_stay_in_bounds_as_cuda_does(backend, device):
    """Out-of-range indices without FASTCASCADE_CHECK (the API raises first on the CPU): gather reads zeros,
    scatter skips the row."""
    x = torch.arange(12.0, device=device).view(4, 3)
    g = _ops.op("gather_rows", backend)(x, torch.tensor([1, 4, -1, 3], device=device))
    assert g.tolist() == [[3, 4, 5], [0, 0, 0], [0, 0, 0], [9, 10, 11]]
    s = _ops.op("scatter_rows", backend)(x, torch.tensor([2, 9, -3, 0], device=device), 3)
    assert s.tolist() == [[9, 10, 11], [0, 0, 0], [0, 1, 2]]


# ---------------------------------------------------------------------------------------------
# vote


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_vote_matches_reference(backend, device, dtype):
    gen = seeded("vote", dtype)
    for K, n, C in [(1, 0, 3), (1, 1, 1), (3, 7, 4), (3, 513, 4), (5, 33, 10), (2, 3, 1000)]:
        x = (torch.randn(K, n, C, generator=gen, dtype=torch.float64) * 2).to(dtype)
        for mode in ["hard", "soft"]:
            labels, probs = fc.vote(x.to(device), mode, return_probs=True, backend=backend)
            want, want_p = reference.vote(x, mode, return_probs=True)
            assert labels.dtype == torch.int64 and labels.shape == (n,)
            assert torch.equal(labels.cpu(), want), (K, n, C, mode)
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            assert probs.dtype == acc and probs.shape == (n, C)
            torch.testing.assert_close(probs.cpu(), want_p, rtol=4 * torch.finfo(acc).eps, atol=4 * torch.finfo(acc).eps)
            members = [m.to(device) for m in x.unbind(0)]
            assert torch.equal(fc.vote(members, mode, backend=backend).cpu(), want)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_vote_rules(backend, device):
    # two members vote weakly for class 1, one strongly for class 0: the majority wins hard, the mass soft
    weak1 = [0.0, 0.2, -5.0]
    strong0 = [9.0, 0.0, 0.0]
    x = torch.tensor([[weak1], [weak1], [strong0]], device=device)
    assert fc.vote(x, "hard", backend=backend).tolist() == [1]
    assert fc.vote(x, "soft", backend=backend).tolist() == [0]
    # 1-1-1 split: the tied class with the largest summed probability wins
    x = torch.tensor([[[3.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]], [[0.0, 0.0, 2.0]]], device=device)
    assert fc.vote(x, "hard", backend=backend).tolist() == [0]
    # tied votes and equal probabilities (mirrored members): the lowest class id
    x = torch.tensor([[[0.5, 2.0]], [[2.0, 0.5]]], device=device)
    assert fc.vote(x, "hard", backend=backend).tolist() == [0]
    assert fc.vote(x, "soft", backend=backend).tolist() == [0]
    # one member is its own argmax
    one = torch.randn(1, 20, 6, generator=seeded("vote1")).to(device)
    assert torch.equal(fc.vote(one, backend=backend), one[0].argmax(1))


# ---------------------------------------------------------------------------------------------
# opcheck, compile, determinism


def _opcheck_samples(device):
    gen = torch.Generator().manual_seed(5)
    x2 = torch.randn(9, 4, generator=gen).to(device)
    rows = torch.randn(9, 2, 3, generator=gen).to(device)
    idx = torch.randperm(9, generator=gen).to(device)
    yield "route_threshold", (torch.randn(9, generator=gen).to(device), 0.4)
    yield "route_argmax", (x2,)
    yield "route_confident", (x2, 1.5, 2.0)
    yield "partition", (torch.randint(0, 3, (9,), generator=gen, dtype=torch.int32).to(device), 3)
    yield "gather_rows", (rows.clone().requires_grad_(True), idx[:5])
    yield "gather_rows", (rows.half(), idx.int())
    yield "scatter_rows", (rows.clone().requires_grad_(True), idx, 11)
    yield "vote", (torch.randn(3, 9, 4, generator=gen).to(device), 0, True)
    yield "vote", (torch.randn(2, 9, 4, generator=gen).to(device), 1, False)


@pytest.mark.parametrize("backend,device", FUSED)
def test_routing_opcheck(backend, device):
    for name, args in _opcheck_samples(device):
        torch.library.opcheck(_ops.op(name, backend), args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def _aot_params():
    return [pytest.param(*p.values, marks=list(p.marks) + ([INTERPRETED_AOT] if p.values[0] == "triton" else []), id=p.id)
            for p in FUSED]


@pytest.mark.parametrize("backend,device", _aot_params())
def test_routing_opcheck_aot(backend, device):
    for name, args in _opcheck_samples(device):
        torch.library.opcheck(_ops.op(name, backend), args, test_utils=("test_aot_dispatch_dynamic",))


@pytest.mark.parametrize("backend,device", _aot_params() + [pytest.param("torch", "cpu", id="torch")])
def test_routing_compiles_fullgraph(backend, device):
    """One cascade level: decide, partition, gather, run two "children", scatter back; and a vote."""
    torch._dynamo.reset()
    gen = seeded("compile")
    w = torch.randn(2, 8, 8, generator=gen).to(device)

    def level(x, stage1_logit, members):
        branch = fc.route_threshold(stage1_logit, 0.4, backend=backend)
        order, counts, offsets = fc.partition(branch, 2, backend=backend)
        xs = fc.gather_rows(x, order, backend=backend)
        pos = torch.arange(x.shape[0], device=x.device)
        is_one = (pos >= offsets[1]).unsqueeze(1)  # rows of branch 1 (static shapes: no data-dependent slicing)
        ys = torch.where(is_one, xs @ w[1], xs @ w[0])
        y = fc.scatter_rows(ys, order, x.shape[0], backend=backend)
        labels = fc.vote(members, backend=backend)
        conf = fc.route_confident(members[0], 0.5, backend=backend)
        return y, counts, labels, conf, fc.route_argmax(members[1], backend=backend)

    x = torch.randn(13, 8, generator=gen).to(device)
    logit = torch.randn(13, generator=gen).to(device)
    members = torch.randn(3, 13, 5, generator=gen).to(device)
    compiled = torch.compile(level, fullgraph=True)
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    eager_out, comp_out = level(xe, logit, members), compiled(xc, logit, members)
    for a, b in zip(eager_out, comp_out):
        torch.testing.assert_close(b, a)
    eager_out[0].square().sum().backward()
    comp_out[0].square().sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad)
    assert xe.grad.abs().sum() > 0


@pytest.mark.parametrize("backend,device", FUSED)
def test_routing_is_deterministic(backend, device):
    gen = seeded("determinism")
    branch = torch.randint(0, 3, (150000 if backend != "triton" else 5000,), generator=gen).to(device)
    members = torch.randn(3, 2000, 4, generator=gen).to(device)
    x = torch.randn(2000, 16, generator=gen).to(device)
    runs = []
    threads = torch.get_num_threads()
    for n in [1, max(2, threads)]:
        torch.set_num_threads(n)
        try:
            p = fc.partition(branch, 3, backend=backend)
            labels, probs = fc.vote(members, return_probs=True, backend=backend)
            g = fc.gather_rows(x, p.order[:2000].remainder(2000), backend=backend)
            runs.append([*p, labels, probs, g, fc.route_confident(members[0], 0.6, backend=backend)])
        finally:
            torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bad_input_names_the_argument(backend, device):
    x1 = torch.randn(5, device=device)
    x2 = torch.randn(5, 3, device=device)
    br = torch.tensor([0, 1, 2, 1, 0], device=device)
    idx = torch.tensor([0, 2], device=device)
    cases = [
        (lambda: fc.route_threshold(x2, backend=backend), ValueError, r"logits must be \(N,\) or \(N, 1\)"),
        (lambda: fc.route_threshold(br, backend=backend), ValueError, "logits must be a floating-point"),
        (lambda: fc.route_threshold(x1, 1.5, backend=backend), ValueError, "threshold"),
        (lambda: fc.route_threshold(x1, -0.1, backend=backend), ValueError, "threshold"),
        (lambda: fc.route_threshold(x1, 0.5, 0.0, backend=backend), ValueError, "temperature"),
        (lambda: fc.route_threshold(x1, 0.5, math.inf, backend=backend), ValueError, "temperature"),
        (lambda: fc.route_threshold(x1.tolist(), backend=backend), TypeError, "logits must be a torch.Tensor"),
        (lambda: fc.route_argmax(x1, backend=backend), ValueError, r"logits must be \(N, C\)"),
        (lambda: fc.route_argmax(x2[:, :0], backend=backend), ValueError, "C >= 1"),
        (lambda: fc.route_confident(x2, 1.2, backend=backend), ValueError, "tau"),
        (lambda: fc.route_confident(x2, 0.5, -1.0, backend=backend), ValueError, "temperature"),
        (lambda: fc.partition(br, 0, backend=backend), ValueError, "num_branches must be >= 1"),
        (lambda: fc.partition(br, 2.0, backend=backend), TypeError, "num_branches must be an int"),
        (lambda: fc.partition(br.float(), 3, backend=backend), ValueError, "branch must be a 1-D int32 or int64"),
        (lambda: fc.partition(br[:, None], 3, backend=backend), ValueError, "branch must be a 1-D"),
        (lambda: fc.gather_rows(x2, idx.float(), backend=backend), ValueError, "index must be a 1-D int32 or int64"),
        (lambda: fc.gather_rows(x2, idx[:, None], backend=backend), ValueError, "index must be a 1-D"),
        (lambda: fc.gather_rows(x2[0, 0], idx, backend=backend), ValueError, "x must have at least one dimension"),
        (lambda: fc.gather_rows(x2, idx + 4, backend=backend), ValueError, r"outside \[0, 5\)"),
        (lambda: fc.gather_rows(x2, idx - 3, backend=backend), ValueError, r"outside \[0, 5\)"),
        (lambda: fc.scatter_rows(x2[:2], idx, 2, backend=backend), ValueError, r"outside \[0, 2\)"),
        (lambda: fc.scatter_rows(x2[:2], idx * 0, 5, backend=backend), ValueError, "twice"),
        (lambda: fc.scatter_rows(x2, idx, 5, backend=backend), ValueError, "one entry per row of src"),
        (lambda: fc.scatter_rows(x2[:2], idx, -1, backend=backend), ValueError, "num_rows must be >= 0"),
        (lambda: fc.vote(x2, backend=backend), ValueError, r"member_logits must be \(K, N, C\)"),
        (lambda: fc.vote(x2[None], "mean", backend=backend), ValueError, "mode"),
        (lambda: fc.vote([x2, x2[:4]], backend=backend), ValueError, r"member_logits\[1\]"),
        (lambda: fc.vote([], backend=backend), ValueError, "non-empty sequence"),
        (lambda: fc.vote(br[None, :, None], backend=backend), ValueError, "floating-point"),
        (lambda: fc.route_argmax(x2, backend="fast"), ValueError, "backend must be one of"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()
    if device == "cpu":
        with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
            fc.partition(br, 3, backend="cuda")


def test_device_mismatch_is_caught_before_the_kernel():
    x = torch.randn(5, 3)
    meta_idx = torch.zeros(2, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="x and index must be on the same device"):
        fc.gather_rows(x, meta_idx)
    with pytest.raises(ValueError, match="src and index must be on the same device"):
        fc.scatter_rows(x[:2], meta_idx, 4)
    with pytest.raises(ValueError, match="member_logits\\[1\\] must be"):
        fc.vote([x, x.to("meta")])


def test_op_level_checks_for_direct_callers():
    ops = torch.ops.fastcascade
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match=r"logits must be \(N,\) or \(N, 1\)"):
        ops.route_threshold(x, 0.0)
    with pytest.raises(RuntimeError, match=r"logits must be \(N, C\) with C >= 1"):
        ops.route_argmax(x[:, :0])
    with pytest.raises(RuntimeError, match="temperature must be > 0"):
        ops.route_confident(x, 0.0, 2.0)
    with pytest.raises(RuntimeError, match="num_branches must be >= 1"):
        ops.partition(torch.zeros(3, dtype=torch.long), 0)
    with pytest.raises(RuntimeError, match="branch must be int32 or int64"):
        ops.partition(torch.zeros(3), 2)
    with pytest.raises(RuntimeError, match=r"gather_rows: index holds 4 at position 1, outside \[0, 4\)"):
        ops.gather_rows(x, torch.tensor([0, 4]))
    with pytest.raises(RuntimeError, match="index must be int32 or int64"):
        ops.gather_rows(x, torch.tensor([0.0]))
    with pytest.raises(RuntimeError, match="index must have one entry per row of src"):
        ops.scatter_rows(x, torch.tensor([0, 1]), 4)
    with pytest.raises(RuntimeError, match="twice"):
        ops.scatter_rows(x[:2], torch.tensor([1, 1]), 4)
    with pytest.raises(RuntimeError, match="mode must be 0"):
        ops.vote(x[None], 2, False)
    with pytest.raises(RuntimeError, match=r"member_logits must be \(K, N, C\)"):
        ops.vote(x, 0, False)


# ---------------------------------------------------------------------------------------------
# GPU only: no host sync, memory safety without checks, FASTCASCADE_CHECK, copy alignments, large N

GPU_FUSED = [pytest.param(b, marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="needs a CUDA device")])
             for b in ["cuda", "triton"]]


@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_routing_never_syncs_the_host(backend):
    dev = "cuda"
    logit = torch.randn(4096, device=dev)
    logits = torch.randn(4096, 4, device=dev)
    x = torch.randn(4096, 512, device=dev, dtype=torch.float16, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        branch = fc.route_threshold(logit, 0.3, backend=backend)
        order, counts, offsets = fc.partition(branch, 2, backend=backend)
        fc.partition(fc.route_argmax(logits, backend=backend), 4, backend=backend)
        fc.route_confident(logits, 0.7, backend=backend)
        y = fc.scatter_rows(fc.gather_rows(x, order, backend=backend), order, 4096, backend=backend)
        y.float().sum().backward()
        fc.vote(torch.stack([logits, logits.flip(1), logits * 2]), return_probs=True, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.equal(y, x) and torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_out_of_range_values_are_memory_safe_and_checkable(backend, monkeypatch):
    dev = "cuda"
    branch = torch.tensor([2, -1, 0, 3, 0, 1, 7, 2, -5], device=dev)
    order, counts, offsets = fc.partition(branch, 3, backend=backend)
    torch.cuda.synchronize()
    assert counts.tolist() == [2, 1, 2] and order[5:].tolist() == [1, 3, 6, 8]
    x = torch.arange(12.0, device=dev).view(4, 3)
    assert fc.gather_rows(x, torch.tensor([1, 4], device=dev), backend=backend).tolist() == [[3, 4, 5], [0, 0, 0]]
    torch.cuda.synchronize()
    monkeypatch.setenv("FASTCASCADE_CHECK", "1")
    with pytest.raises(ValueError, match="outside"):
        fc.partition(branch, 3, backend=backend)
    with pytest.raises(ValueError, match="outside"):
        fc.gather_rows(x, torch.tensor([1, 4], device=dev), backend=backend)
    with pytest.raises(ValueError, match="twice"):
        fc.scatter_rows(x[:2], torch.tensor([1, 1], device=dev), 4, backend=backend)


@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_copy_widths_and_large_partition(backend):
    gen = seeded("gpu-copy")
    base = torch.randn(1 << 14, generator=gen).half().cuda()
    for start, D in [(0, 512), (1, 512), (2, 36), (4, 12), (3, 7)]:  # 16-, 2-, 4-, 8-, 2-byte words
        rows = base[start:start + 40 * D].view(40, D)
        idx = torch.randperm(40, generator=gen).cuda()
        assert torch.equal(fc.gather_rows(rows, idx, backend=backend), rows[idx])
        assert torch.equal(fc.scatter_rows(rows, idx, 41, backend=backend)[idx], rows)
    for B in [3, 2000]:  # the shared-memory tiles and the sort fallback
        branch = torch.randint(0, B, (1 << 20,), generator=gen).cuda()
        got = fc.partition(branch, B, backend=backend)
        want = reference.partition(branch.cpu(), B)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want))


def test_every_routing_op_runs_on_meta_tensors():
    """Fake kernels of the C++ ops and their Triton twins: static output shapes, no data needed."""
    suffixes = ("", "_triton") if _ops.HAS_TRITON else ("",)
    if _ops.HAS_TRITON:
        _ops.load_triton_ops()
    meta = {"device": "meta"}
    for suffix in suffixes:
        ops = lambda name: getattr(torch.ops.fastcascade, name + suffix)  # noqa: E731
        assert ops("route_threshold")(torch.empty(7, **meta), 0.0).shape == (7,)
        assert ops("route_argmax")(torch.empty(7, 3, **meta)).dtype == torch.int32
        assert ops("route_confident")(torch.empty(7, 3, **meta), 1.0, 2.0).shape == (7,)
        order, counts, offsets = ops("partition")(torch.empty(7, dtype=torch.int32, **meta), 3)
        assert (order.shape, counts.shape, offsets.shape) == ((7,), (3,), (4,))
        x = torch.empty(7, 2, 5, dtype=torch.float16, requires_grad=True, **meta)
        g = ops("gather_rows")(x, torch.empty(4, dtype=torch.long, **meta))
        assert g.shape == (4, 2, 5) and g.grad_fn is not None
        assert ops("scatter_rows")(g, torch.empty(4, dtype=torch.long, **meta), 9).shape == (9, 2, 5)
        labels, probs = ops("vote")(torch.empty(3, 7, 4, dtype=torch.bfloat16, **meta), 0, True)
        assert labels.dtype == torch.int64 and probs.shape == (7, 4) and probs.dtype == torch.float32


if _ops.HAS_TRITON:
    import triton
    import triton.language as tl

    from fastcascade.kernels.routing import _member_offsets

    @triton.jit
    def _member_offsets_kernel(out_ptr, k, N, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.arange(0, BLOCK_R).to(tl.int64) + N - BLOCK_R  # the last rows of member k
        cols = tl.arange(0, BLOCK_C)
        off = _member_offsets(k, N, rows, C, cols)
        tl.store(out_ptr + tl.arange(0, BLOCK_R)[:, None] * BLOCK_C + cols[None, :], off)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the offset helper under the interpreter")
def test_vote_member_offsets_are_int64_past_2_31():
    """vote reads member k's rows at (k N + row) C + c; with K N >= 2^31 an int32 k * N wraps (the
    interpreter's int32 arithmetic wraps as the GPU's does). The offsets alone, no 2^31-element tensor."""
    K, N, C = 3, 2**30 + 3, 4  # member 2 starts at 2 N C > 2^33
    out = torch.empty(4, C, dtype=torch.int64)
    _member_offsets_kernel[(1,)](out, K - 1, N, C, BLOCK_R=4, BLOCK_C=C)
    rows = torch.arange(N - 4, N, dtype=torch.int64)
    want = ((K - 1) * N + rows)[:, None] * C + torch.arange(C)[None, :]
    assert torch.equal(out, want)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_triton_routing_runs_on_the_tensors_device():
    """Triton launches on the current device: tensors on cuda:1 while cuda:0 is current must still be
    read on cuda:1 (the op guards the launch with the tensors' device)."""
    gen = seeded("second-device")
    logits = torch.randn(3, 999, 4, generator=gen)
    branch = torch.randint(0, 3, (5000,), generator=gen)
    with torch.cuda.device(0):
        labels, probs = fc.vote(logits.to("cuda:1"), "soft", return_probs=True, backend="triton")
        got = fc.partition(branch.to("cuda:1"), 3, backend="triton")
        torch.cuda.synchronize(1)
    want_labels, want_probs = reference.vote(logits, "soft", True)
    assert labels.device == torch.device("cuda:1") and torch.equal(labels.cpu(), want_labels)
    torch.testing.assert_close(probs.cpu(), want_probs)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, reference.partition(branch, 3)))
