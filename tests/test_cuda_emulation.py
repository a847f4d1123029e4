"""The CUDA kernels run on the CPU: csrc/<stem>/<stem>_kernels.cuh, the text nvcc compiles, under the
emulation of CUDA's execution model in tests/emulation/ (a fiber per thread, barriers, 32-lane warp
operations, shared memory poisoned at every block and bounds-checked, forward / reverse / seeded random
schedules). Launch shapes come from the ops' <stem>_launch.h with the limits of an H100 (132 SMs, 227 KB
opt-in) and of a small GPU (2 SMs, 48 KB), where grid-stride loops go round at these test sizes.

Each kernel runs at the shapes below against fastcascade.reference (integer outputs exact, floats within
the tolerance model), with bitwise-equal outputs under the three schedules; the mutation tests build
kernels with a known defect and check that the same checks catch it.

Families emulated so far: metrics (confusion_kernel), focal (sigmoid_focal_kernel, softmax_focal_kernel,
softmax_focal_prob_kernel, finalize_kernel, block_sum), routing (route_threshold/argmax/confident,
partition_tiles (count and place), partition_offsets, copy_rows, vote), dice_focal (forward, chunks,
backward), pooled_adapter (forward, backward) and pixel_adapter (forward, backward): every __global__
function of csrc/. Every kernel runs at every non-benchmark shape (and, where the table names them,
every dtype) of its family's case table (fastcascade/selftest/cases/), besides the launch shapes listed here.
`pytest -m sweep tests/test_cuda_emulation.py` runs larger shapes (deselected otherwise).

One kernel by hand:  pytest tests/test_cuda_emulation.py -k confusion
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import emulation as emu
import pytest
import torch
from conftest import assert_within_model, reference_errors, seeded

from fastcascade import reference
from fastcascade.selftest.cases import dice_focal as dice_table
from fastcascade.selftest.cases import focal as focal_table
from fastcascade.selftest.cases import metrics as metrics_table
from fastcascade.selftest.cases import pixel_adapter as pixel_table
from fastcascade.selftest.cases import pooled_adapter as pooled_table
from fastcascade.selftest.cases import routing as routing_table

REPO = Path(__file__).resolve().parent.parent


def sweep(*values) -> list:
    """Larger shapes, run by hand only: `pytest -m sweep tests/test_cuda_emulation.py` (conftest deselects
    the marker unless -m names it)."""
    return [pytest.param(*(v if isinstance(v, tuple) else (v,)), marks=pytest.mark.sweep) for v in values]

SCHEDULES = [("forward", 0), ("reverse", 0), ("random", 1234)]
REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}


# Set by test_global_memory_stays_in_bounds for the subprocess it runs: every buffer next to a guard page.
GUARD = os.environ.get("FASTCASCADE_EMULATION_GUARD") == "1"


@pytest.fixture(scope="module")
def kernels():
    return emu.build().guarded() if GUARD else emu.build()


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's bit pattern (NaN-safe equality)."""
    if t.dtype == torch.bool or not t.is_floating_point():
        return t
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def same_bits(a, b) -> bool:
    return all(x.shape == y.shape and torch.equal(bits(x), bits(y)) for x, y in zip(a, b))


def under_all_schedules(run):
    """run(schedule, seed) under the three schedules; asserts the outputs are bitwise equal, returns them.
    (The guarded rerun checks memory bounds, which do not depend on the schedule: forward only.)"""
    outs = [run(s, seed) for s, seed in (SCHEDULES[:1] if GUARD else SCHEDULES)]
    for (s, _), o in zip(SCHEDULES[1:], outs[1:]):
        assert same_bits(outs[0], o), f"the {s} schedule gives other bits than the forward one"
    return outs[0]


# ---------------------------------------------------------------------------------------------
# the runtime itself, on toy kernels (tests/emulation/runtime_checks.cpp)

NEIGHBOURS = torch.tensor([(i + 1) % 64 + 1 for i in range(64)], dtype=torch.int32)


def test_barrier_makes_every_schedule_agree(kernels):
    for s, seed in SCHEDULES:
        out = torch.zeros(64, dtype=torch.int32)
        kernels.runtime_check(0, s, seed, out)
        assert torch.equal(out, NEIGHBOURS), s


def test_missing_barrier_gives_schedule_dependent_results(kernels):
    outs = {}
    for s, seed in SCHEDULES:
        out = torch.zeros(64, dtype=torch.int32)
        kernels.runtime_check(1, s, seed, out)
        outs[s] = out
    # forward: each thread reads its neighbour's slot before the neighbour runs (the poison, -1);
    # reverse: the neighbour has run, except for the wrap-around
    assert (outs["forward"][:-1] == -1).all()
    assert torch.equal(outs["reverse"][:-1], NEIGHBOURS[:-1]) and outs["reverse"][-1] == -1
    assert not torch.equal(outs["random"], outs["forward"]) and not torch.equal(outs["random"], outs["reverse"])


def test_warp_operations(kernels):
    lane = torch.arange(64) % 32
    tid = torch.arange(64)
    expect = torch.stack([
        torch.where(lane + 3 < 32, tid + 3, tid),                       # __shfl_down_sync(., tid, 3)
        torch.tensor([sum(1 << k for k in range(32) if k % 4 == i % 4) for i in range(64)]).to(torch.int32),
        torch.full((64,), 8),                                           # __popc of 8 peers
        torch.where(lane + 16 < 32, lane + 16, lane),                    # a double through offset 16
    ], 1).to(torch.int32).reshape(-1)
    for s, seed in SCHEDULES:
        out = torch.zeros(256, dtype=torch.int32)
        kernels.runtime_check(2, s, seed, out)
        assert torch.equal(out, expect), s


def test_exited_lane_named_by_a_mask_is_an_error(kernels):
    # forward: lanes 0..15 wait when lane 16 exits; reverse: the exited lanes are seen by the shuffle
    with pytest.raises(emu.EmulationError, match=r"exited while lanes of its warp wait for it in __shfl_down_sync"):
        kernels.runtime_check(3, out=torch.zeros(64, dtype=torch.int32))
    with pytest.raises(emu.EmulationError, match=r"__shfl_down_sync\(mask 0xffffffff\) names lane 16, which has exited"):
        kernels.runtime_check(3, "reverse", out=torch.zeros(64, dtype=torch.int32))


def test_returned_threads_count_as_arrived(kernels):
    out = torch.zeros(64, dtype=torch.int32)
    kernels.runtime_check(4, "reverse", 0, out)
    assert torch.equal(out, torch.tensor([0 if i % 3 == 0 else 7 for i in range(64)], dtype=torch.int32))


def test_deadlock_is_reported(kernels):
    with pytest.raises(emu.EmulationError, match="__syncthreads while lanes of its warp wait in __syncwarp|deadlock"):
        kernels.runtime_check(5, out=torch.zeros(64, dtype=torch.int32))


def test_shared_indices_are_checked(kernels):
    with pytest.raises(emu.EmulationError, match=r"shared array slot\[32\] indexed at 32"):
        kernels.runtime_check(6, out=torch.zeros(64, dtype=torch.int32))
    with pytest.raises(emu.EmulationError, match=r"shared array buf\[16\] indexed at 16"):
        kernels.runtime_check(7, out=torch.zeros(1, dtype=torch.int32))


def test_shared_memory_is_poisoned_at_every_block(kernels):
    f = torch.zeros(8, dtype=torch.float32)
    u = torch.zeros(4, dtype=torch.int32)
    kernels.runtime_check(8, out=f, out2=u)  # two blocks: the second sees poison, not the first's writes
    assert torch.isnan(f).all() and (u == -1).all()


def test_indices_and_atomics_cover_a_3d_grid(kernels):
    for s, seed in SCHEDULES:
        total = torch.zeros(1, dtype=torch.int64)
        per_block = torch.zeros(12, dtype=torch.int32)
        seen = torch.zeros(12 * 48, dtype=torch.int32)
        kernels.runtime_check(9, s, seed, total, per_block, seen)
        assert total.item() == 12 * 48 and (per_block == 48).all() and (seen == 1).all(), s


def test_static_shared_beyond_the_launch_configuration_is_an_error(kernels):
    with pytest.raises(emu.EmulationError, match="256 bytes of static shared memory, its launch configuration counts 16"):
        kernels.runtime_check(10, out=torch.zeros(64, dtype=torch.int32))


def test_guarded_buffers_catch_an_access_past_the_end(kernels):
    out, src = torch.zeros(1), torch.ones(4)
    kernels.runtime_check(11, out=out, out2=torch.ones(5)[:4])  # in bounds of the unguarded storage
    code = ("import torch, emulation; k = emulation.build().guarded(); "
            "k.runtime_check(11, out=torch.zeros(1), out2=torch.ones(4)); print('survived')")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO / "tests", capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])})
    assert res.returncode == -signal.SIGSEGV and "survived" not in res.stdout, (res.returncode, res.stderr[-2000:])


@pytest.mark.skipif(GUARD, reason="this is the test that runs the guarded subprocess")
def test_global_memory_stays_in_bounds():
    """The kernel tests again in a subprocess, every buffer next to a guard page (tests/emulation: _Guarded):
    a read or write past the end of any buffer kills it. Both launch shapes, the forward schedule only."""
    subset = ("confusion_kernel or sigmoid_focal_kernel or softmax_focal_kernel or softmax_focal_prob or route "
              "or partition or copy_rows "
              "or vote or dice_focal or pooled_adapter or pixel_adapter")
    # -P: like the outer run, the child imports the installed package, not the source tree it starts in
    res = subprocess.run([sys.executable, "-P", "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                          "-k", subset], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "FASTCASCADE_EMULATION_GUARD": "1"})
    assert res.returncode == 0, f"guarded run failed (rc {res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-2000:]}"


# ---------------------------------------------------------------------------------------------
# metrics: confusion_kernel

# (N, C): one block, tails, several blocks, grid-stride on the small GPU (16 blocks of 1024 elements);
# C = 40 keeps 4 shared histograms, C = 120 none (global atomics)
# with every (N, C) of the family's case table (fastcascade/selftest/cases/metrics.py)
CONFUSION_SHAPES = sorted({(0, 3), (1, 1), (37, 5), (5000, 40), (20000, 3), (3000, 120)} | set(metrics_table.SIZES))
CONFUSION_SHAPES += sweep((200_000, 7), (50_000, 100))


def confusion_inputs(N, C, pdt, tdt, gen):
    t = torch.randint(-1, C + 1, (N,), generator=gen)  # ids outside [0, C) count nowhere
    p = torch.randint(0, C, (N,), generator=gen)
    return p.to(pdt), t.to(tdt)


def check_confusion(k, N, C, pdt=torch.int64, tdt=torch.int64, ignore=None, devices=emu.DEVICES):
    p, t = confusion_inputs(N, C, pdt, tdt, seeded("confusion", N, C))
    want = reference.confusion_matrix(p, t, C, ignore)
    for name, dev in devices.items():
        (out,) = under_all_schedules(lambda s, seed: (k.confusion_matrix(p, t, C, ignore, device=dev, schedule=s,
                                                                          seed=seed),))
        assert torch.equal(out, want), f"confusion {N}x{C} on {name}"


@pytest.mark.parametrize("N,C", CONFUSION_SHAPES)
def test_confusion_kernel(kernels, N, C):
    check_confusion(kernels, N, C)


@pytest.mark.parametrize("pdt,tdt", [(torch.int32, torch.int64), (torch.int32, torch.int32)])
def test_confusion_kernel_id_dtypes_and_ignore(kernels, pdt, tdt):
    check_confusion(kernels, 2000, 6, pdt, tdt, ignore=2)


# ---------------------------------------------------------------------------------------------
# focal: sigmoid_focal_kernel, softmax_focal_kernel, finalize_kernel (block_sum)

# N: scalar tail only, vector body and tail, several blocks (H100), grid-stride (small GPU)
# with the element count of every non-benchmark row of the case table (the kernel sees the flat logits)
SIGMOID_SHAPES = sorted({0, 1, 7, 1003, 20003} | {math.prod(r.shape) for r in focal_table.SIGMOID if r.tier != "bench"})
SIGMOID_SHAPES += sweep(300_001)


def sigmoid_reference(x, t, alpha, gamma, reduction, eps):
    x64 = x.detach().double().requires_grad_()
    loss = reference.sigmoid_focal_loss(x64, t.double(), alpha, gamma, REDUCTIONS[reduction], eps)
    (g,) = torch.autograd.grad(loss.sum(), x64) if x.numel() else (torch.zeros_like(x64),)
    return loss.detach(), g


def check_sigmoid(k, N, dtype=torch.float32, tdt=torch.float32, alpha=0.25, gamma=2.0, eps=0.0, reduction=1,
                  misaligned=False, devices=emu.DEVICES):
    gen = seeded("sigmoid", N, dtype, tdt, alpha, gamma, eps, reduction)
    base = (torch.randn(N + 1, generator=gen, dtype=torch.float64) * 3).to(dtype)
    x = base[1:] if misaligned else base[:N].clone()  # at offset 1: the scalar path
    t = (torch.rand(N, generator=gen) > 0.7).to(tdt)
    want_loss, want_grad = sigmoid_reference(x, t, alpha, gamma, reduction, eps)
    a = -1.0 if alpha is None else alpha
    # only the logits are nudged: a nudged target of 1 would lie outside [0, 1], which is invalid input
    ref_err = reference_errors(
        lambda xx: list(sigmoid_reference(xx, t, alpha, gamma, reduction, eps)), [x.double()], dtype
    ) if N and dtype != torch.float64 else [0.0, 0.0]
    for name, dev in devices.items():
        loss, grad, scale = under_all_schedules(
            lambda s, seed: k.sigmoid_focal(x, t, a, gamma, eps, reduction, True, device=dev, schedule=s, seed=seed))
        what = f"sigmoid focal N={N} {dtype} {REDUCTIONS[reduction]} on {name}"
        if N == 0:
            assert torch.allclose(loss, want_loss.to(dtype), equal_nan=True) if reduction else loss.numel() == 0, what
            continue
        assert_within_model(loss, want_loss, ref_err[0], what + ": loss")
        assert_within_model((grad.double() * scale.double()).to(dtype), want_grad, ref_err[1], what + ": grad")


@pytest.mark.parametrize("N", SIGMOID_SHAPES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_sigmoid_focal_kernel(kernels, N, reduction):
    check_sigmoid(kernels, N, reduction=reduction)


@pytest.mark.parametrize("dtype,tdt,misaligned,alpha,gamma,eps", [
    (torch.float32, torch.float32, True, 0.25, 2.0, 0.0),      # the scalar path
    (torch.bfloat16, torch.uint8, False, None, 1.5, 0.1),      # 8-wide vectors, uint8 targets
    (torch.float16, torch.bool, True, 0.5, 0.7, 0.0),          # generic pow, scalar path
    (torch.float64, torch.float64, False, 0.25, 2.5, 0.05),    # double accumulators
])
def test_sigmoid_focal_kernel_dtypes_and_paths(kernels, dtype, tdt, misaligned, alpha, gamma, eps):
    check_sigmoid(kernels, 5003, dtype, tdt, alpha, gamma, eps, reduction=1, misaligned=misaligned)


def test_sigmoid_focal_loss_without_grad_matches_with(kernels):
    x = torch.randn(1003, generator=seeded("nograd")) * 3
    t = (torch.rand(1003, generator=seeded("nograd t")) > 0.5).float()
    for reduction in (0, 1):
        with_grad = kernels.sigmoid_focal(x, t, 0.25, 2.0, 0.0, reduction, True)
        without = kernels.sigmoid_focal(x, t, 0.25, 2.0, 0.0, reduction, False)
        assert same_bits([with_grad[0], with_grad[2]], [without[0], without[2]]) and without[1].numel() == 0


# (N, C, S): rows R = N S; one block, several blocks, grid-stride on the small GPU (R > 16 x 256)
# with every non-benchmark (N, C, d1, ...) row of the case table as (N, C, d1 * ...)
SOFTMAX_SHAPES = sorted({(0, 5, 1), (1, 3, 1), (37, 5, 1), (2000, 7, 1), (50, 4, 100)}
                        | {(r.shape[0], r.shape[1], math.prod(r.shape[2:])) for r in focal_table.SOFTMAX
                           if r.tier != "bench"})
SOFTMAX_SHAPES += sweep((300, 19, 64))


def softmax_reference(x, t, w, gamma, ignore, eps, reduction):
    x64 = x.detach().double().requires_grad_()
    loss = reference.softmax_focal_loss(x64, t, gamma, None if w is None else w.double(), ignore, eps,
                                        REDUCTIONS[reduction])
    (g,) = torch.autograd.grad(loss.sum(), x64) if x.numel() else (torch.zeros_like(x64),)
    return loss.detach(), g


def check_softmax(k, N, C, S, dtype=torch.float32, weighted=False, gamma=2.0, eps=0.0, reduction=1,
                  devices=emu.DEVICES):
    gen = seeded("softmax", N, C, S, dtype, weighted, gamma, eps, reduction)
    shape = (N, C) if S == 1 else (N, C, S)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    t = torch.randint(0, C, (N,) if S == 1 else (N, S), generator=gen)
    ignore = -100
    t = torch.where(torch.rand(t.shape, generator=gen) < 0.2, torch.full_like(t, ignore), t)
    w = torch.rand(C, generator=gen) + 0.5 if weighted else None
    want_loss, want_grad = softmax_reference(x, t, w, gamma, ignore, eps, reduction)
    ref_err = reference_errors(lambda xx: list(softmax_reference(xx, t, w, gamma, ignore, eps, reduction)),
                               [x.double()], dtype) if N and dtype != torch.float64 else [0.0, 0.0]
    for name, dev in devices.items():
        loss, grad, scale = under_all_schedules(
            lambda s, seed: k.softmax_focal(x, t, w, gamma, eps, ignore, reduction, True, device=dev, schedule=s,
                                            seed=seed))
        what = f"softmax focal {shape} {dtype} {REDUCTIONS[reduction]} on {name}"
        if N == 0:
            assert torch.allclose(loss, want_loss.to(dtype), equal_nan=True) if reduction else loss.numel() == 0, what
            continue
        assert_within_model(loss, want_loss, ref_err[0], what + ": loss")
        assert_within_model((grad.double() * scale.double()).to(dtype), want_grad, ref_err[1], what + ": grad")


@pytest.mark.parametrize("N,C,S", SOFTMAX_SHAPES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_softmax_focal_kernel(kernels, N, C, S, reduction):
    check_softmax(kernels, N, C, S, reduction=reduction)


@pytest.mark.parametrize("dtype,weighted,gamma,eps", [
    (torch.float32, True, 2.0, 0.1),
    (torch.bfloat16, True, 1.3, 0.0),   # generic pow
    (torch.float64, False, 0.5, 0.0),
])
def test_softmax_focal_kernel_dtypes_and_weights(kernels, dtype, weighted, gamma, eps):
    check_softmax(kernels, 300, 6, 1, dtype, weighted, gamma, eps, reduction=1)


# softmax_focal_prob_kernel: class-probability targets, at the same shapes


def random_distributions(shape, gen, dtype=torch.float32):
    """Rows (along dim 1) of class probabilities: softmax rows, some of them one-hot or mixup pairs (zeros)."""
    r = torch.softmax(torch.randn(shape, generator=gen, dtype=torch.float64) * 2, 1)
    C = shape[1]
    hard = torch.nn.functional.one_hot(torch.randint(0, C, (shape[0],) + tuple(shape[2:]), generator=gen), C)
    hard = hard.movedim(-1, 1).double()
    lam = torch.rand((shape[0], 1) + tuple(shape[2:]), generator=gen, dtype=torch.float64)
    pick = torch.rand((shape[0], 1) + tuple(shape[2:]), generator=gen) < 0.3
    return torch.where(pick, lam * hard + (1 - lam) * hard.roll(1, 1), r).to(dtype)


def softmax_prob_reference(x, r, w, gamma, eps, reduction):
    x64 = x.detach().double().requires_grad_()
    loss = reference.softmax_focal_loss(x64, r.double(), gamma, None if w is None else w.double(), -100, eps,
                                        REDUCTIONS[reduction])
    (g,) = torch.autograd.grad(loss.sum(), x64) if x.numel() else (torch.zeros_like(x64),)
    return loss.detach(), g


def check_softmax_prob(k, N, C, S, dtype=torch.float32, rdt=None, weighted=False, gamma=2.0, eps=0.0, reduction=1,
                       devices=emu.DEVICES):
    gen = seeded("softmax prob", N, C, S, dtype, rdt, weighted, gamma, eps, reduction)
    shape = (N, C) if S == 1 else (N, C, S)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    r = random_distributions(shape, gen, rdt or dtype)
    w = torch.rand(C, generator=gen) + 0.5 if weighted else None
    want_loss, want_grad = softmax_prob_reference(x, r, w, gamma, eps, reduction)
    ref_err = reference_errors(lambda xx: list(softmax_prob_reference(xx, r, w, gamma, eps, reduction)),
                               [x.double()], dtype) if N and dtype != torch.float64 else [0.0, 0.0]
    for name, dev in devices.items():
        loss, grad, scale = under_all_schedules(
            lambda s, seed: k.softmax_focal_prob(x, r, w, gamma, eps, reduction, True, device=dev, schedule=s,
                                                 seed=seed))
        what = f"softmax focal probabilities {shape} {dtype} {REDUCTIONS[reduction]} on {name}"
        if N == 0:
            assert torch.allclose(loss, want_loss.to(dtype), equal_nan=True) if reduction else loss.numel() == 0, what
            continue
        assert_within_model(loss, want_loss, ref_err[0], what + ": loss")
        assert_within_model((grad.double() * scale.double()).to(dtype), want_grad, ref_err[1], what + ": grad")


@pytest.mark.parametrize("N,C,S", SOFTMAX_SHAPES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_softmax_focal_prob_kernel(kernels, N, C, S, reduction):
    check_softmax_prob(kernels, N, C, S, reduction=reduction)


@pytest.mark.parametrize("dtype,rdt,weighted,gamma,eps", [
    (torch.float32, torch.float32, True, 2.0, 0.1),
    (torch.bfloat16, torch.float32, True, 1.3, 0.0),   # float32 probabilities with bf16 logits; generic pow
    (torch.float16, torch.float16, False, 2.5, 0.05),  # probabilities in the logits' dtype
    (torch.float64, torch.float64, False, 0.5, 0.0),
])
def test_softmax_focal_prob_kernel_dtypes_and_weights(kernels, dtype, rdt, weighted, gamma, eps):
    check_softmax_prob(kernels, 300, 6, 1, dtype, rdt, weighted, gamma, eps, reduction=1)


def test_softmax_focal_prob_rows_that_are_not_distributions_are_nan(kernels):
    """No host check on CUDA: such rows give NaN loss and gradient, "mean" NaN; the others are untouched."""
    gen = seeded("softmax prob bad rows")
    x = torch.randn(8, 5, 3, generator=gen)
    r = random_distributions((8, 5, 3), gen)
    r[1, 2, 0] = -0.25           # a negative entry (the sum still 1)
    r[1, 3, 0] += 0.25
    r[4, :, 2] *= 1.01           # sums to 1.01
    r[6, 0, 1] = float("nan")
    bad = torch.zeros(8, 3, dtype=torch.bool)
    bad[1, 0] = bad[4, 2] = bad[6, 1] = True
    loss, grad, _ = kernels.softmax_focal_prob(x, r, None, 2.0, 0.1, 0, True)
    want, _ = softmax_prob_reference(x, r, None, 2.0, 0.1, 0)
    assert torch.isnan(loss[bad]).all() and torch.isnan(grad.movedim(1, -1)[bad]).all()
    assert torch.isfinite(grad.movedim(1, -1)[~bad]).all()
    torch.testing.assert_close(loss[~bad].double(), want[~bad], rtol=1e-5, atol=1e-6)
    assert torch.isnan(want[bad]).all()
    assert torch.isnan(kernels.softmax_focal_prob(x, r, None, 2.0, 0.1, 1, True)[0])


def test_sigmoid_focal_targets_outside_0_1_are_nan(kernels):
    """One behaviour on every backend: a target outside [0, 1] is invalid, that element's loss and gradient NaN."""
    x = torch.randn(1003, generator=seeded("sigmoid bad targets")) * 3
    t = torch.rand(1003, generator=seeded("sigmoid bad targets t"))
    t[[0, 5, 17, 1002]] = torch.tensor([2.0, -1.0, 1.0 + 1e-6, float("nan")])
    bad = torch.zeros(1003, dtype=torch.bool)
    bad[[0, 5, 17, 1002]] = True
    loss, grad, _ = kernels.sigmoid_focal(x, t, 0.25, 2.0, 0.1, 0, True)
    want, want_grad = sigmoid_reference(x, t, 0.25, 2.0, 0, 0.1)
    assert torch.isnan(loss[bad]).all() and torch.isnan(grad[bad]).all() and torch.isnan(want[bad]).all()
    torch.testing.assert_close(loss[~bad].double(), want[~bad], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[~bad].double(), want_grad[~bad], rtol=1e-5, atol=1e-6)
    assert torch.isnan(kernels.sigmoid_focal(x, t, 0.25, 2.0, 0.0, 1, False)[0])
    u8 = torch.tensor([0, 1, 2, 255], dtype=torch.uint8)
    loss, _, _ = kernels.sigmoid_focal(torch.randn(4), u8, 0.25, 2.0, 0.0, 0, False)
    assert torch.isfinite(loss[:2]).all() and torch.isnan(loss[2:]).all()


# ---------------------------------------------------------------------------------------------
# routing: the decision kernels, partition (count, scan, place, offsets), copy_rows, vote

# N: one block, several, grid-stride on the small GPU (32 blocks of 256 rows)
# with the case table's row counts and every logit dtype it names (fastcascade/selftest/cases/routing.py)
ROW_COUNTS = sorted({0, 1, 1000, 9000} | set(routing_table.SIZES))
ROUTE_DTYPES = list(routing_table.FLOATS)


def on_all_launch_shapes(run, want, what):
    for name, dev in emu.DEVICES.items():
        outs = under_all_schedules(lambda s, seed: run(dev, s, seed))
        for o, w in zip(outs, want):
            assert o.dtype == w.dtype and torch.equal(o, w), f"{what} on {name}"


@pytest.mark.parametrize("N", ROW_COUNTS)
@pytest.mark.parametrize("dtype", ROUTE_DTYPES)
def test_route_threshold_kernel(kernels, N, dtype):
    x = (torch.randn(N, generator=seeded("threshold", N)) * 4).to(dtype)
    if N > 2:
        x[0], x[1] = float("nan"), float("inf")
    c = reference.logit_threshold(0.3, 1.5)
    on_all_launch_shapes(lambda d, s, seed: (kernels.route_threshold(x, c, device=d, schedule=s, seed=seed),),
                         [reference.route_threshold(x, 0.3, 1.5)], f"route_threshold N={N} {dtype}")


@pytest.mark.parametrize("N", ROW_COUNTS)
@pytest.mark.parametrize("dtype", ROUTE_DTYPES)
def test_route_argmax_and_confident_kernels(kernels, N, dtype):
    C = 7
    x = (torch.randn(N, C, generator=seeded("route rows", N)) * 3).to(dtype)
    if N > 2:
        x[0, 3] = float("nan")
        x[1, :] = x[1, 2]  # ties: the first maximum
    on_all_launch_shapes(lambda d, s, seed: (kernels.route_rows(x, device=d, schedule=s, seed=seed),),
                         [reference.route_argmax(x)], f"route_argmax N={N} {dtype}")
    on_all_launch_shapes(lambda d, s, seed: (kernels.route_rows(x, 1.5, 1 / 0.4, device=d, schedule=s, seed=seed),),
                         [reference.route_confident(x, 0.4, 1.5)], f"route_confident N={N} {dtype}")


# (N, B): one tile, a tile and one row, several blocks of 8 tiles; ids outside [0, B) go last
@pytest.mark.parametrize("N,B", [(1, 1), (511, 3), (513, 3), (20000, 5), (3000, 200)])
@pytest.mark.parametrize("idt", [torch.int64, torch.int32])
def test_partition_kernels(kernels, N, B, idt):
    b = torch.randint(-1, B + 1, (N,), generator=seeded("partition", N, B)).to(idt)
    on_all_launch_shapes(lambda d, s, seed: kernels.partition(b, B, device=d, schedule=s, seed=seed),
                         reference.partition(b, B), f"partition N={N} B={B}")


# rows of 28, 32, 3 and 10 bytes: 4-, 16-, 1- and 2-byte vectors; at an odd offset, 1-byte ones
@pytest.mark.parametrize("row,dtype", [((7,), torch.float32), ((2, 4), torch.float32), ((3,), torch.uint8),
                                       ((5,), torch.bfloat16)])
@pytest.mark.parametrize("misaligned", [False, True])
def test_copy_rows_kernel(kernels, row, dtype, misaligned):
    gen = seeded("copy rows", row, dtype)
    rows = 3000
    base = (torch.randn((rows + 1, *row), generator=gen) * 100).to(dtype)
    x = base[1:] if misaligned else base[:rows].clone()
    index = torch.randint(0, rows, (2500,), generator=gen)
    on_all_launch_shapes(lambda d, s, seed: (kernels.gather_rows(x, index, device=d, schedule=s, seed=seed),),
                         [reference.gather_rows(x, index)], f"gather_rows {row} {dtype}")
    perm = torch.randperm(rows + 100, generator=gen)[:rows].to(torch.int32)  # injective into rows + 100
    on_all_launch_shapes(lambda d, s, seed: (kernels.scatter_rows(x, perm, rows + 100, device=d, schedule=s,
                                                                  seed=seed),),
                         [reference.scatter_rows(x, perm, rows + 100)], f"scatter_rows {row} {dtype}")


def test_copy_rows_kernel_out_of_range_rows(kernels):
    x = torch.arange(40, dtype=torch.float32).view(10, 4)
    index = torch.tensor([3, -1, 10, 9])
    out = kernels.gather_rows(x, index)
    assert torch.equal(out, torch.stack([x[3], torch.zeros(4), torch.zeros(4), x[9]]))  # reads as zeros
    out = kernels.scatter_rows(x[:3], torch.tensor([5, -2, 99]), 6)
    assert torch.equal(out, torch.zeros(6, 4).index_copy(0, torch.tensor([5]), x[:1]))  # skipped


@pytest.mark.parametrize("K,N,C", [(1, 1, 1), (3, 1000, 5), (4, 9000, 3)])
@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vote_kernel(kernels, K, N, C, mode, dtype):
    x = (torch.randn(K, N, C, generator=seeded("vote", K, N, C)) * 2).to(dtype)
    labels, probs = reference.vote(x, "hard" if mode == 0 else "soft", return_probs=True)
    for name, dev in emu.DEVICES.items():
        got, sums = under_all_schedules(lambda s, seed: kernels.vote(x, mode, True, device=dev, schedule=s, seed=seed))
        assert torch.equal(got, labels), f"vote labels {K}x{N}x{C} on {name}"
        torch.testing.assert_close(sums, probs, rtol=1e-6, atol=1e-7)
        got_only, _ = kernels.vote(x, mode, False, device=dev)
        assert torch.equal(got_only, labels)


# ---------------------------------------------------------------------------------------------
# dice_focal: dice_focal_forward_kernel + dice_focal_chunks_kernel (the per-image sums), and
# dice_focal_backward_kernel (given the Dice coefficients the .cu computes in ATen)

def dice_stats(x, t, w, gamma, ignore):
    """Per image [focal sum, normaliser, inter (C), card (C)] as the kernels sum them, in x's dtype;
    x (B, C, S), t (B, S)."""
    B, C = x.shape[:2]
    xs, ts = x, t
    keep = ts != ignore
    p = torch.softmax(xs, 1) * keep.unsqueeze(1)
    onehot = torch.nn.functional.one_hot(torch.where(keep, ts, 0), C).movedim(-1, 1).to(x.dtype) * keep.unsqueeze(1)
    focal = torch.stack([reference.softmax_focal_loss(xs[b: b + 1], ts[b: b + 1], gamma, w, ignore, 0.0, "sum")
                         for b in range(B)]) if B else x.new_zeros(0)
    ww = torch.ones(C, dtype=x.dtype) if w is None else w.to(x.dtype)
    norm = (ww[torch.where(keep, ts, 0)] * keep).sum(1)
    return [torch.cat([focal.reshape(B, 1), norm.reshape(B, 1), (p * onehot).sum(2), (p + onehot).sum(2)], 1)]


def dice_grad(x, t, w, gamma, ignore, coef, fs):
    """The gradient the backward kernel writes: d/dx of fs * focal sum + sum_c alpha_c card_c + beta_c inter_c
    (coef = [alpha (C), beta (C)] per image; the +1 of card has no gradient)."""
    x64 = x.detach().double().requires_grad_()
    B, C = x.shape[:2]
    stats = dice_stats(x64, t, w, gamma, ignore)[0]
    f = fs.double() * stats[:, 0].sum() + (coef.double()[:, :C] * stats[:, 2 + C:]).sum() \
        + (coef.double()[:, C:] * stats[:, 2: 2 + C]).sum()
    return torch.autograd.grad(f, x64)[0] if x.numel() else torch.zeros_like(x64)


# (B, C, S): one pixel; two chunks of 4096 per image; 128-thread blocks (C = 30); 32-thread blocks
# (C = 100); C = 200 opts in to more shared memory (H100) and is refused on the small GPU
@pytest.mark.parametrize("B,C,S", [(0, 3, 4), (1, 3, 1), (2, 4, 5000), (3, 5, 700), (2, 30, 300), (1, 100, 300),
                                   (1, 200, 100)])
@pytest.mark.parametrize("dtype,weighted,gamma", [(torch.float32, True, 2.0), (torch.bfloat16, False, 1.3)])
def test_dice_focal_kernels(kernels, B, C, S, dtype, weighted, gamma):
    gen = seeded("dice", B, C, S, dtype)
    x = (torch.randn(B, C, S, generator=gen, dtype=torch.float64) * 3).to(dtype)
    t = torch.randint(0, C, (B, S), generator=gen)
    t = torch.where(torch.rand(B, S, generator=gen) < 0.2, torch.full_like(t, -100), t)
    w = torch.rand(C, generator=gen) + 0.5 if weighted else None
    coef = torch.randn(B, 2 * C, generator=gen)
    fs = torch.rand((), generator=gen) + 0.1
    if x.numel():
        want = dice_stats(x.double(), t, w, gamma, -100)[0]
        want_grad = dice_grad(x, t, w, gamma, -100, coef, fs)
        errs = reference_errors(lambda xx: dice_stats(xx, t, w, gamma, -100) + [dice_grad(xx, t, w, gamma, -100, coef,
                                                                                          fs)], [x.double()], dtype)
    for name, dev in emu.DEVICES.items():
        what = f"dice_focal {B}x{C}x{S} {dtype} on {name}"
        if C == 200 and name == "small":
            with pytest.raises(emu.EmulationError, match="at most .* classes"):
                kernels.dice_focal_forward(x, t, w, gamma, -100, device=dev)
            continue
        (sums,) = under_all_schedules(lambda s, seed: (kernels.dice_focal_forward(x, t, w, gamma, -100, device=dev,
                                                                                  schedule=s, seed=seed),))
        (grad,) = under_all_schedules(lambda s, seed: (kernels.dice_focal_backward(x, t, w, coef, fs, gamma, -100,
                                                                                   device=dev, schedule=s, seed=seed),))
        if not x.numel():
            assert sums.shape == (B, 2 * C + 2) and grad.numel() == 0, what
            continue
        assert_within_model(sums.to(dtype), want, errs[0], what + ": sums")
        assert_within_model(grad, want_grad, errs[1], what + ": grad")


# ---------------------------------------------------------------------------------------------
# pooled_adapter: pooled_adapter_fwd_kernel and pooled_adapter_bwd_kernel. The backward's weight
# gradients (at::mm over the kernel's gu, gh, a in the .cu) are formed here the same way.

def adapter_case(expected, gen, shape, C, r, dtype, channels_last, act, scale, dropout, drop_seed):
    """Inputs of an adapter kernel test (x and the upstream gradient gy in `shape`, weights and biases of a
    C -> r -> C bottleneck), expected(...)'s outputs on them and the reference's own errors in dtype."""
    x, gy = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    if channels_last:
        x, gy = x.to(memory_format=torch.channels_last), gy.to(memory_format=torch.channels_last)
    wd, wu = torch.randn(r, C, generator=gen) / C ** 0.5, torch.randn(C, r, generator=gen) / r ** 0.5
    bd, bu = torch.randn(r, generator=gen) * 0.1, torch.randn(C, generator=gen) * 0.1
    want = expected(x, wd, bd, wu, bu, act, scale, dropout, drop_seed, gy)
    errs = reference_errors(lambda *t: expected(*t[:5], act, t[5], dropout, drop_seed, t[6]),
                            [t.double() for t in (x, wd, bd, wu, bu, scale, gy)], dtype)
    return x, gy, wd, bd, wu, bu, want, errs


def pooled_expected(x, wd, bd, wu, bu, act, scale, p, drop_seed, gy):
    """Float64 oracle: the forward outputs, and the reference's gradients (x, down_w, down_b, up_w, up_b, scale)."""
    leaves = [t.detach().double().requires_grad_() for t in (x, wd, bd, wu, bu, scale)]
    x64, wd64, bd64, wu64, bu64, s64 = leaves
    y = reference.pooled_adapter(x64, wd64, bd64, wu64, bu64, act, s64, p, drop_seed)
    pooled = x64.mean((2, 3))
    hidden = pooled @ wd64.T + bd64
    grads = torch.autograd.grad((y * gy.double()).sum(), leaves)
    return [y.detach(), pooled.detach(), hidden.detach(), *grads]


# (B, C, H, W, r): one element; tails of the 256-thread loops; C above the block (channel loops)
@pytest.mark.parametrize("B,C,H,W,r", [(1, 1, 1, 1, 1), (2, 5, 7, 9, 3), (3, 300, 2, 3, 40), (2, 16, 20, 20, 8)])
@pytest.mark.parametrize("dtype,act,channels_last,dropout", [(torch.float32, "relu", False, 0.0),
                                                             (torch.float32, "gelu", True, 0.3),
                                                             (torch.bfloat16, "silu", True, 0.0)])
def test_pooled_adapter_kernels(kernels, B, C, H, W, r, dtype, act, channels_last, dropout):
    check_pooled(kernels, B, C, H, W, r, dtype, act, channels_last, dropout)


def _table_rows(table):
    return [r for r in table.SHAPES if r.tier != "bench"]


@pytest.mark.parametrize("row", _table_rows(pooled_table), ids=lambda r: f"{r.shape}-{r.layout}")
@pytest.mark.parametrize("dtype", pooled_table.DTYPES)
def test_pooled_adapter_kernels_at_the_case_table(kernels, row, dtype):
    B, C, H, W = row.shape
    check_pooled(kernels, B, C, H, W, row["r"], dtype, row.kw.get("act", "relu"), row.layout == "channels_last", 0.0)


def test_pooled_adapter_kernels_opt_in(kernels):
    """C = 3100 float64 sums need 49.6 KB of shared memory: opted in on the H100, refused on the small GPU.
    (float64: in fp32 at C = 7000, the fp32 size of this shape, the forward's C-long dot products, one thread
    each, carry an error that d/d scale amplifies beyond the tolerance model: 9.4e-6 against 3.0e-6.)"""
    check_pooled(kernels, 1, 3100, 1, 2, 4, torch.float64, "gelu", False, 0.0)


def check_pooled(kernels, B, C, H, W, r, dtype, act, channels_last, dropout):
    scale, drop_seed = torch.tensor(0.7), 1234
    x, gy, wd, bd, wu, bu, want, errs = adapter_case(pooled_expected, seeded("pooled", B, C, H, W, r, dtype, act),
                                                     (B, C, H, W), C, r, dtype, channels_last, act, scale, dropout,
                                                     drop_seed)
    for name, dev in emu.DEVICES.items():
        what = f"pooled_adapter {B}x{C}x{H}x{W} r={r} {dtype} {act} on {name}"
        if C == 3100 and name == "small":
            with pytest.raises(emu.EmulationError, match="bytes of shared memory"):
                kernels.pooled_adapter_forward(x, wd, bd, wu, bu, act, scale, dropout, drop_seed, device=dev)
            continue
        y, pooled, hidden = under_all_schedules(lambda s, seed: kernels.pooled_adapter_forward(
            x, wd, bd, wu, bu, act, scale, dropout, drop_seed, device=dev, schedule=s, seed=seed))
        assert y.is_contiguous(memory_format=torch.channels_last) == channels_last or C == 1 or H * W == 1, what  # both formats at once
        gx, gu, gh, a, gs = under_all_schedules(lambda s, seed: kernels.pooled_adapter_backward(
            gy, hidden, wd, wu, bu, act, scale, dropout, drop_seed, device=dev, schedule=s, seed=seed))
        got = [y, pooled.to(dtype), hidden.to(dtype), gx, (gh.T @ pooled).to(dtype), gh.sum(0).to(dtype),
               (gu.T @ a).to(dtype), gu.sum(0).to(dtype), gs.sum().to(dtype)]
        names = ["y", "pooled", "hidden", "grad x", "grad down_w", "grad down_b", "grad up_w", "grad up_b",
                 "grad scale"]
        for g, w_, e, n in zip(got, want, errs, names):
            if dtype == torch.float64:  # the reference is the truth here: only the floor would be left
                torch.testing.assert_close(g, w_, rtol=1e-11, atol=1e-13, msg=f"{what}: {n}")
            else:
                assert_within_model(g, w_, e, f"{what}: {n}")


# ---------------------------------------------------------------------------------------------
# pixel_adapter: pixel_adapter_fwd_kernel and pixel_adapter_bwd_kernel. The backward's weight gradients
# and d/ds (at::mm, sums and a dot over the kernel's gh, a and per-block partials in the .cu) are formed
# here the same way.

def pixel_expected(x, wd, bd, wu, bu, act, scale, p, drop_seed, gy):
    leaves = [t.detach().double().requires_grad_() for t in (x, wd, bd, wu, bu, scale)]
    y = reference.pixel_adapter(*leaves[:5], act, leaves[5], 1 if x.dim() == 4 else -1, p, drop_seed)
    return [y.detach(), *torch.autograd.grad((y * gy.double()).sum(), leaves)]


# x: tokens (T, C) or (B, C, H, W) in either format; r = 4000 needs the opt-in shared memory backward
# (3 x r floats per position) on the H100 and is refused on the small GPU
@pytest.mark.parametrize("shape,r,channels_last", [((1, 1), 1, False), ((37, 5), 3, False), ((2000, 24), 16, False),
                                                   ((2, 6, 5, 7), 4, False), ((2, 6, 5, 7), 4, True),
                                                   ((3, 2), 4000, False)])
@pytest.mark.parametrize("dtype,act,dropout", [(torch.float32, "gelu", 0.25), (torch.bfloat16, "relu", 0.0)])
def test_pixel_adapter_kernels(kernels, shape, r, channels_last, dtype, act, dropout):
    C = shape[1] if len(shape) == 4 else shape[-1]
    scale, drop_seed = torch.tensor(1.3), 77
    x, gy, wd, bd, wu, bu, want, errs = adapter_case(pixel_expected, seeded("pixel", shape, r, dtype, act), shape, C,
                                                     r, dtype, channels_last, act, scale, dropout, drop_seed)
    for name, dev in emu.DEVICES.items():
        what = f"pixel_adapter {shape} r={r} {dtype} {act} on {name}"
        if r == 4000 and name == "small":
            with pytest.raises(emu.EmulationError, match="too wide"):
                kernels.pixel_adapter_backward(gy, x, wd, bd, wu, act, scale, dropout, drop_seed, device=dev)
            continue
        (y,) = under_all_schedules(lambda s, seed: (kernels.pixel_adapter_forward(
            x, wd, bd, wu, bu, act, scale, dropout, drop_seed, device=dev, schedule=s, seed=seed),))
        gx, gh, a, gs = under_all_schedules(lambda s, seed: kernels.pixel_adapter_backward(
            gy, x, wd, bd, wu, act, scale, dropout, drop_seed, device=dev, schedule=s, seed=seed))
        acc = gh.dtype
        g2 = (gy.movedim(1, -1) if gy.dim() == 4 else gy).reshape(-1, C).to(acc)
        x2 = (x.movedim(1, -1) if x.dim() == 4 else x).reshape(-1, C).to(acc)
        g_sum = g2.sum(0)
        got = [y, gx, (gh.T @ x2).to(dtype), gh.sum(0).to(dtype), (g2.T @ a * scale).to(dtype),
               (g_sum * scale).to(dtype), (gs.sum() + g_sum.double() @ bu.double()).to(dtype)]
        names = ["y", "grad x", "grad down_w", "grad down_b", "grad up_w", "grad up_b", "grad scale"]
        for g, w_, e, n in zip(got, want, errs, names):
            assert_within_model(g, w_, e, f"{what}: {n}")


# ---------------------------------------------------------------------------------------------
# the checks bite: each mutant (FC_MUTATION in csrc) fails the check that the real kernels pass

MUTANT_CHECKS = {
    # block_sum called twice in one kernel: softmax's pass (loss and count) and its mean finalize
    "BLOCK_SUM_SECOND_SYNC": lambda k: check_softmax(k, 2000, 7, 1, reduction=1),
    # the scalar tail of 3 elements loses its last one
    "TAIL_OFF_BY_ONE": lambda k: check_sigmoid(k, 7, reduction=0),
    # the first warp-shuffle stage starts at offset 8: lanes 16..31 never reach lane 0
    "SHUFFLE_OFFSET": lambda k: check_sigmoid(k, 1003, reduction=1),
    # the shared histograms are read without being zeroed
    "HIST_NOT_ZEROED": lambda k: check_confusion(k, 5000, 40),
}


def test_every_mutant_has_a_check_and_a_switch():
    uses = re.findall(r"^\s*#if\s+!?FC_MUTATION\((\w+)\)", "\n".join(
        p.read_text() for p in (REPO / "csrc").rglob("*") if p.suffix in (".h", ".cuh", ".cu", ".cpp")), re.M)
    assert sorted(set(uses)) == sorted(emu.MUTATIONS) == sorted(MUTANT_CHECKS)


@pytest.mark.parametrize("mutation", emu.MUTATIONS)
def test_mutant_fails_the_emulated_check(kernels, mutation):
    MUTANT_CHECKS[mutation](kernels)  # the real kernels pass it
    emu.prebuild(emu.MUTATIONS)  # the mutants compile in parallel, once
    with pytest.raises((AssertionError, emu.EmulationError)):
        MUTANT_CHECKS[mutation](emu.build(mutation))


def _preprocess(*defines: str) -> subprocess.CompletedProcess:
    src = '#include "common/device_shared.cuh"\n#if FC_MUTATION(TAIL_OFF_BY_ONE)\n#error mutant\n#endif\n'
    return subprocess.run([emu._compiler(), "-E", "-x", "c++", f"-I{REPO / 'csrc'}", *defines, "-"], input=src,
                          capture_output=True, text=True)


def test_mutation_switches_do_not_exist_outside_the_emulation():
    # a shipped build (no FASTCASCADE_EMULATION) ignores the switch even when someone defines it
    assert _preprocess("-DFC_MUTATE_TAIL_OFF_BY_ONE=1").returncode == 0
    on = _preprocess("-DFC_MUTATE_TAIL_OFF_BY_ONE=1", "-DFASTCASCADE_EMULATION", "-DFC_EMU_SHARED=x")
    assert on.returncode != 0 and "mutant" in on.stderr
    # nothing that builds the package defines the emulation or a mutant, and FC_MUTATION only appears in #if
    for p in [REPO / "setup.py", REPO / "pyproject.toml", *(REPO / "csrc").rglob("*")]:
        if p.is_file():
            for line in p.read_text().splitlines():
                if line.lstrip().startswith("//"):
                    continue
                assert not re.search(r"(#define|-D)\s*(FASTCASCADE_EMULATION|FC_MUTATE_)", line), f"{p}: {line}"
                if "FC_MUTATION(" in line and p.name != "device_shared.cuh":
                    assert re.match(r"\s*#if\s", line), f"{p}: {line}"


# every non-benchmark row of the Dice + focal and pixel adapter case tables, in every dtype they name


@pytest.mark.parametrize("row", _table_rows(dice_table), ids=lambda r: f"{r.shape}-{r.layout}")
@pytest.mark.parametrize("dtype", dice_table.DTYPES)
def test_dice_focal_kernels_at_the_case_table(kernels, row, dtype):
    B, C = row.shape[:2]  # the .cu makes the logits contiguous (B, C, S) first, whatever their layout
    test_dice_focal_kernels(kernels, B, C, math.prod(row.shape[2:]), dtype, row.kw.get("weighted", False), 2.0)


@pytest.mark.parametrize("row", _table_rows(pixel_table), ids=lambda r: f"{r.shape}-{r.layout}")
@pytest.mark.parametrize("dtype", pixel_table.DTYPES)
def test_pixel_adapter_kernels_at_the_case_table(kernels, row, dtype):
    test_pixel_adapter_kernels(kernels, row.shape, row["r"], row.layout == "channels_last", dtype,
                               row.kw.get("act", "relu"), 0.0)
