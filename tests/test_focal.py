"""Fused focal losses: every backend against fastcascade.reference, torchvision and F.cross_entropy."""

import itertools
import os

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import (
    assert_within_model,
    backend_params,
    fused_backend_params,
    random_logits,
    reference_errors,
    rel_err,
    seeded,
)

import fastcascade as fc
from fastcascade import reference
from fastcascade.selftest.cases import focal as table
from fastcascade.selftest.cases import for_tests

DTYPES = list(table.DTYPES)


def _targets(shape, kind, device, gen=None):
    if kind == "soft":
        return torch.rand(shape, generator=gen).to(device)
    hard = torch.rand(shape, generator=gen) > 0.7
    return {"float": hard.float(), "bool": hard, "uint8": hard.to(torch.uint8)}[kind].to(device)


def _grad_out(loss, gen=None):
    # not all ones, so a backward that ignores its upstream gradient fails
    # exactly representable in every dtype under test (bf16 values in [0.5, 1.5)), so the float64
    # reference and a bf16 backend get the same upstream gradient
    g = (torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5).to(torch.bfloat16)
    return g.to(loss.dtype).to(loss.device)


def _fwd_bwd(fn, logits, *args, **kw):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, *args, **kw)
    g = _grad_out(loss, torch.Generator().manual_seed(1))
    (loss * g).sum().backward()
    return loss.detach(), x.grad


# ---------------------------------------------------------------------------------------------
# sigmoid focal: reference equivalence


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [r.shape for r in for_tests(table.SIGMOID)], ids=str)
@pytest.mark.parametrize("reduction", table.REDUCTIONS)
def test_sigmoid_matches_reference(backend, device, dtype, shape, reduction):
    gen = seeded(shape, reduction)
    combos = [(0.25, 2.0, 0.0, "float"), (None, 0.5, 0.1, "soft"), (0.6, 5.0, 0.0, "bool"), (-1.0, 0.0, 0.2, "uint8")]
    for alpha, gamma, eps, tkind in combos:
        x = random_logits(shape, generator=gen)
        t = _targets(shape, tkind, "cpu", gen)
        kw = dict(alpha=alpha, gamma=gamma, reduction=reduction, label_smoothing=eps)
        def ref(x):
            return _fwd_bwd(reference.sigmoid_focal_loss, x, t, **kw)  # noqa: B023 (called in this iteration)

        l64, g64 = ref(x.double())
        lerr, gerr = reference_errors(ref, [x.double()], dtype, generator=gen)
        out, grad = _fwd_bwd(fc.sigmoid_focal_loss, x.to(device, dtype), t.to(device), backend=backend, **kw)
        assert out.dtype == dtype and out.shape == l64.shape and grad.dtype == dtype
        what = f"{backend} {dtype} {shape} {reduction} alpha={alpha} gamma={gamma} eps={eps} {tkind}"
        assert_within_model(out, l64, lerr, "loss " + what)
        assert_within_model(grad, g64, gerr, "grad " + what)


@pytest.mark.parametrize("backend,device", fused_backend_params())
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_sigmoid_matches_torchvision(backend, device, reduction):
    x = random_logits((64, 37))
    t = _targets((64, 37), "float", "cpu")
    for alpha, gamma in [(0.25, 2.0), (-1, 2.5), (0.5, 0.0)]:
        ltv, gtv = _fwd_bwd(torchvision.ops.sigmoid_focal_loss, x, t, alpha, gamma, reduction)
        out, grad = _fwd_bwd(fc.sigmoid_focal_loss, x.to(device), t.to(device), alpha, gamma, reduction,
                             backend=backend)
        torch.testing.assert_close(out.cpu(), ltv, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.cpu(), gtv, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend,device", fused_backend_params())
def test_sigmoid_gamma0_is_bce(backend, device):
    x = random_logits((513,))
    t = torch.rand(513)
    for reduction in ["none", "mean", "sum"]:
        lb, gb = _fwd_bwd(F.binary_cross_entropy_with_logits, x, t, reduction=reduction)
        out, grad = _fwd_bwd(fc.sigmoid_focal_loss, x.to(device), t.to(device), None, 0.0, reduction,
                             backend=backend)
        torch.testing.assert_close(out.cpu(), lb, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.cpu(), gb, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend,device", fused_backend_params())
@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.5, 1.0, 2.0, 5.0])
def test_sigmoid_saturated_and_infinite_logits(backend, device, gamma):
    x = torch.tensor(table.SIGMOID_SATURATED)
    t = (x > 0).float()  # matching hard targets: loss ~ 0, no NaN, no inf
    for dtype in [torch.float32, torch.bfloat16, torch.float16]:
        for alpha in [0.25, None]:
            for eps in [0.0, 0.1]:
                out, grad = _fwd_bwd(fc.sigmoid_focal_loss, x.to(device, dtype), t.to(device), alpha, gamma, "none",
                                     eps, backend=backend)
                # smoothed targets make an infinite logit infinitely wrong: only finite logits need a finite loss
                finite = torch.isfinite(x).to(device) if eps else torch.ones_like(x, dtype=torch.bool).to(device)
                assert torch.isfinite(out[finite]).all() and torch.isfinite(grad).all(), (dtype, alpha, eps, out, grad)
                if eps == 0.0:
                    assert out.abs().max() < 1e-6 and grad.abs().max() < 1e-6
    # wrong-side saturation: the loss grows with |x| (inf at inf, as torchvision), the gradient stays finite
    out, grad = _fwd_bwd(fc.sigmoid_focal_loss, x.to(device), (1 - t).to(device), 0.25, gamma, "none",
                         backend=backend)
    assert torch.isfinite(grad).all()
    assert torch.isfinite(out[:6]).all() and torch.isinf(out[6:8]).all()


# ---------------------------------------------------------------------------------------------
# softmax focal: reference equivalence


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [r.shape for r in for_tests(table.SOFTMAX)], ids=str)
@pytest.mark.parametrize("reduction", table.REDUCTIONS)
def test_softmax_matches_reference(backend, device, dtype, shape, reduction):
    gen = seeded(shape, reduction)
    C = shape[1]
    tshape = (shape[0],) + shape[2:]
    for gamma, eps, use_w, ignore in [(2.0, 0.0, False, -100), (0.5, 0.1, True, 1), (0.0, 0.05, True, -100)]:
        if C == 1:
            gamma = max(gamma, 1.0)  # the reference's (1 - p)^gamma has a NaN gradient at p = 1 for gamma < 1
        x = random_logits(shape, generator=gen)
        t = torch.randint(0, C, tshape, generator=gen)
        t.view(-1)[0] = (ignore + 1) % C  # at least one counted row: "mean" over none is NaN (tested apart)
        w = torch.rand(C, generator=gen) + 0.5 if use_w else None
        kw = dict(gamma=gamma, ignore_index=ignore, label_smoothing=eps, reduction=reduction)
        def ref(x):
            return _fwd_bwd(reference.softmax_focal_loss, x, t, weight=w, **kw)  # noqa: B023

        l64, g64 = ref(x.double())
        lerr, gerr = reference_errors(ref, [x.double()], dtype, generator=gen)
        wd = None if w is None else w.to(device)
        out, grad = _fwd_bwd(fc.softmax_focal_loss, x.to(device, dtype), t.to(device), weight=wd, backend=backend,
                             **kw)
        assert out.dtype == dtype and out.shape == l64.shape
        what = f"{backend} {dtype} {shape} {reduction} gamma={gamma} eps={eps} w={use_w} ignore={ignore}"
        assert_within_model(out, l64, lerr, "loss " + what)
        assert_within_model(grad, g64, gerr, "grad " + what)


@pytest.mark.parametrize("backend,device", fused_backend_params())
def test_softmax_gamma0_is_cross_entropy(backend, device):
    """gamma=0 equals F.cross_entropy in value and gradient for every option combination."""
    gen = torch.Generator().manual_seed(0)
    for shape in [(40, 5), (3, 4, 6, 2)]:
        C = shape[1]
        x = random_logits(shape, generator=gen)
        t = torch.randint(0, C, (shape[0],) + shape[2:], generator=gen)
        t.view(-1)[::7] = 2  # some rows hit the ignore_index below
        w = torch.rand(C, generator=gen) + 0.1
        for use_w, ignore, eps, reduction in itertools.product([False, True], [-100, 2], [0.0, 0.2],
                                                               ["none", "mean", "sum"]):
            wt = w if use_w else None
            lce, gce = _fwd_bwd(F.cross_entropy, x, t, weight=wt, ignore_index=ignore, label_smoothing=eps,
                                reduction=reduction)
            out, grad = _fwd_bwd(fc.softmax_focal_loss, x.to(device), t.to(device), 0.0,
                                 None if wt is None else wt.to(device), ignore, eps, reduction, backend=backend)
            msg = f"{shape} w={use_w} ignore={ignore} eps={eps} {reduction}"
            torch.testing.assert_close(out.cpu(), lce, rtol=2e-5, atol=2e-6, msg=msg)
            torch.testing.assert_close(grad.cpu(), gce, rtol=2e-5, atol=2e-6, msg=msg)


@pytest.mark.parametrize("backend,device", fused_backend_params())
def test_softmax_wide_rows_match_cross_entropy(backend, device):
    """Rows wider than the CPU lane kernel (C > 64) and than the Triton register tile (C > 4096)."""
    for n, C in [(9, 70), (3, 5000)]:
        x = random_logits((n, C))
        t = torch.randint(0, C, (n,))
        w = torch.rand(C) + 0.5
        lce, gce = _fwd_bwd(F.cross_entropy, x, t, weight=w, label_smoothing=0.1)
        out, grad = _fwd_bwd(fc.softmax_focal_loss, x.to(device), t.to(device), 0.0, w.to(device),
                             label_smoothing=0.1, backend=backend)
        torch.testing.assert_close(out.cpu(), lce, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(grad.cpu(), gce, rtol=2e-5, atol=2e-6)
        l64, g64 = _fwd_bwd(reference.softmax_focal_loss, x.double(), t, 2.0, w)
        out, grad = _fwd_bwd(fc.softmax_focal_loss, x.to(device), t.to(device), 2.0, w.to(device), backend=backend)
        torch.testing.assert_close(out.cpu().double(), l64, rtol=2e-5, atol=1e-7)
        torch.testing.assert_close(grad.cpu().double(), g64, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("backend,device", [p for p in fused_backend_params()])
def test_softmax_confident_rows_keep_relative_precision(backend, device):
    """log p and 1 - p of a confident class are formed without cancellation: each row's loss is
    within a few fp32 ulps of float64, where the plain fp32 formula loses most of its digits."""
    gen = torch.Generator().manual_seed(11)
    x = random_logits((2000, 3), torch.float64, scale=4.0, generator=gen)
    t = x.argmax(1)  # the target is the confident class: loss ~ (1 - p)^gamma (1 - p), tiny
    for gamma in [0.0, 2.0]:
        ref = reference.softmax_focal_loss(x, t, gamma, reduction="none")
        out = fc.softmax_focal_loss(x.float().to(device), t.to(device), gamma, reduction="none", backend=backend)
        plain = reference.softmax_focal_loss(x.float(), t, gamma, reduction="none")
        rel = ((out.cpu().double() - ref).abs() / ref).max().item()
        rel_plain = ((plain.double() - ref).abs() / ref).max().item()
        assert rel < 3e-5 and rel < rel_plain / 10, (gamma, rel, rel_plain)


@pytest.mark.parametrize("backend,device", fused_backend_params())
@pytest.mark.parametrize("gamma", [0.0, 0.3, 2.0, 5.0])
def test_softmax_saturated_logits(backend, device, gamma):
    x = torch.tensor([row for row, _ in table.SOFTMAX_SATURATED])
    t = torch.tensor([target for _, target in table.SOFTMAX_SATURATED])
    for dtype in [torch.float32, torch.bfloat16]:
        for eps in [0.0, 0.1]:
            out, grad = _fwd_bwd(fc.softmax_focal_loss, x.to(device, dtype), t.to(device), gamma,
                                 label_smoothing=eps, reduction="none", backend=backend)
            assert torch.isfinite(grad).all(), (dtype, eps, grad)
            if eps == 0.0:
                assert torch.isfinite(out).all() and out.abs().max() < 1e-2


@pytest.mark.parametrize("backend,device", fused_backend_params())
def test_softmax_single_class_is_zero(backend, device):
    x = random_logits((9, 1))
    t = torch.zeros(9, dtype=torch.long)
    for gamma in [0.0, 0.3, 2.0]:
        out, grad = _fwd_bwd(fc.softmax_focal_loss, x.to(device), t.to(device), gamma, reduction="none",
                             label_smoothing=0.1, backend=backend)
        assert (out == 0).all() and (grad == 0).all()


@pytest.mark.parametrize("backend,device", fused_backend_params())
def test_softmax_all_rows_ignored_matches_torch(backend, device):
    x = random_logits((6, 4))
    t = torch.full((6,), -100)
    out, grad = _fwd_bwd(fc.softmax_focal_loss, x.to(device), t.to(device), 2.0, backend=backend)
    lce, gce = _fwd_bwd(F.cross_entropy, x, t)
    assert torch.isnan(out) and torch.isnan(lce)
    torch.testing.assert_close(grad.cpu(), gce)


# ---------------------------------------------------------------------------------------------
# softmax focal with class-probability targets (floating, the logits' shape), as F.cross_entropy


def _probs(shape, gen=None, dtype=torch.float32):
    """Class probabilities along dim 1: softmax rows, with some rows one-hot and some mixup pairs (exact
    zeros, where log p may be -inf without harm)."""
    if len(shape) < 2:  # unbatched (C,)
        return torch.softmax(torch.randn(shape, generator=gen, dtype=torch.float64) * 2, 0).to(dtype)
    r = torch.softmax(torch.randn(shape, generator=gen, dtype=torch.float64) * 2, 1)
    C, rows = shape[1], (shape[0],) + tuple(shape[2:])
    hard = F.one_hot(torch.randint(0, C, rows, generator=gen), C).movedim(-1, 1).double()
    lam = torch.rand((shape[0], 1) + tuple(shape[2:]), generator=gen, dtype=torch.float64)
    kind = torch.rand((shape[0], 1) + tuple(shape[2:]), generator=gen)
    r = torch.where(kind < 0.2, hard, torch.where(kind < 0.4, lam * hard + (1 - lam) * hard.roll(1, 1), r))
    return r.to(dtype).contiguous()


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [r.shape for r in for_tests(table.SOFTMAX)], ids=str)
@pytest.mark.parametrize("reduction", table.REDUCTIONS)
def test_softmax_probabilities_match_reference(backend, device, dtype, shape, reduction):
    gen = seeded("probs", shape, reduction)
    C = shape[1]
    for gamma, eps, use_w, pdt in [(2.0, 0.0, False, None), (0.5, 0.1, True, torch.float32), (0.0, 0.05, True, None)]:
        if C == 1:
            gamma = max(gamma, 1.0)  # the reference's (1 - p)^gamma has a NaN gradient at p = 1 for gamma < 1
        x = random_logits(shape, generator=gen)
        r = _probs(shape, gen, pdt or dtype)  # in the logits' dtype, or float32 beside low-precision logits
        w = torch.rand(C, generator=gen) + 0.5 if use_w else None
        kw = dict(gamma=gamma, label_smoothing=eps, reduction=reduction)
        def ref(x):
            return _fwd_bwd(reference.softmax_focal_loss, x, r, weight=w, **kw)  # noqa: B023

        l64, g64 = ref(x.double())
        lerr, gerr = reference_errors(ref, [x.double()], dtype, generator=gen)
        wd = None if w is None else w.to(device)
        out, grad = _fwd_bwd(fc.softmax_focal_loss, x.to(device, dtype), r.to(device), weight=wd, backend=backend,
                             **kw)
        assert out.dtype == dtype and out.shape == l64.shape
        what = f"{backend} {dtype} {shape} {reduction} gamma={gamma} eps={eps} w={use_w} probs {r.dtype}"
        assert_within_model(out, l64, lerr, "loss " + what)
        assert_within_model(grad, g64, gerr, "grad " + what)


@pytest.mark.parametrize("backend,device", backend_params())
def test_softmax_probabilities_gamma0_is_cross_entropy(backend, device):
    """gamma=0 equals F.cross_entropy with probability targets in value and gradient, for every option:
    weights enter the sum but "mean" divides by the number of rows, and label smoothing mixes in the
    uniform distribution."""
    gen = torch.Generator().manual_seed(0)
    for shape in [(40, 5), (3, 4, 6, 2), (5,)]:
        C = shape[1] if len(shape) > 1 else shape[0]
        w = torch.rand(C, generator=gen) + 0.1
        for dtype, tol in [(torch.float32, dict(rtol=2e-5, atol=2e-6)), (torch.float64, dict(rtol=1e-12, atol=1e-14))]:
            x = random_logits(shape, dtype, generator=gen)
            r = _probs(shape, gen, dtype)
            for use_w, eps, reduction in itertools.product([False, True], [0.0, 0.2], ["none", "mean", "sum"]):
                wt = w.to(dtype) if use_w else None
                lce, gce = _fwd_bwd(F.cross_entropy, x, r, weight=wt, label_smoothing=eps, reduction=reduction)
                out, grad = _fwd_bwd(fc.softmax_focal_loss, x.to(device), r.to(device), 0.0,
                                     None if wt is None else wt.to(device), 3, eps, reduction, backend=backend)
                msg = f"{shape} {dtype} w={use_w} eps={eps} {reduction}"
                assert out.dtype == dtype and out.shape == lce.shape, msg
                torch.testing.assert_close(out.cpu(), lce, msg=msg, **tol)
                torch.testing.assert_close(grad.cpu(), gce, msg=msg, **tol)


@pytest.mark.parametrize("backend,device", fused_backend_params())
def test_softmax_probabilities_wide_rows_match_cross_entropy(backend, device):
    """Rows wider than the CPU lane kernel (C > 64) and than the Triton register tile (C > 4096)."""
    for shape in [(9, 70), (3, 5000), (2, 4100, 3)]:
        x = random_logits(shape)
        r = _probs(shape)
        w = torch.rand(shape[1]) + 0.5
        lce, gce = _fwd_bwd(F.cross_entropy, x, r, weight=w, label_smoothing=0.1)
        out, grad = _fwd_bwd(fc.softmax_focal_loss, x.to(device), r.to(device), 0.0, w.to(device),
                             label_smoothing=0.1, backend=backend)
        torch.testing.assert_close(out.cpu(), lce, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(grad.cpu(), gce, rtol=2e-5, atol=2e-6)
        l64, g64 = _fwd_bwd(reference.softmax_focal_loss, x.double(), r, 2.0, w, reduction="none")
        out, grad = _fwd_bwd(fc.softmax_focal_loss, x.to(device), r.to(device), 2.0, w.to(device), reduction="none",
                             backend=backend)
        torch.testing.assert_close(out.cpu().double(), l64, rtol=2e-5, atol=1e-7)
        torch.testing.assert_close(grad.cpu().double(), g64, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("backend,device", backend_params())
def test_one_hot_probabilities_equal_class_indices(backend, device):
    """One-hot rows are the index form: per row exactly, and for "mean" without weights (with weights the
    two normalisers differ, as in F.cross_entropy)."""
    gen = torch.Generator().manual_seed(4)
    x = random_logits((30, 6, 5), generator=gen).to(device)
    t = torch.randint(0, 6, (30, 5), generator=gen).to(device)
    r = F.one_hot(t, 6).movedim(-1, 1).float()
    w = (torch.rand(6, generator=gen) + 0.5).to(device)
    for reduction, weight in [("none", w), ("sum", w), ("mean", None)]:
        a, ga = _fwd_bwd(fc.softmax_focal_loss, x, t, 2.0, weight, label_smoothing=0.1, reduction=reduction,
                         backend=backend)
        b, gb = _fwd_bwd(fc.softmax_focal_loss, x, r, 2.0, weight, label_smoothing=0.1, reduction=reduction,
                         backend=backend)
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(gb, ga, rtol=1e-6, atol=1e-7)
    a = fc.softmax_focal_loss(x, t, 2.0, w, backend=backend)
    b = fc.softmax_focal_loss(x, r, 2.0, w, backend=backend)
    torch.testing.assert_close(b, a * w[t].sum() / t.numel())  # a weight sum against a row count


@pytest.mark.parametrize("backend,device", fused_backend_params())
def test_softmax_probabilities_saturated_logits(backend, device):
    x = torch.tensor([row for row, _ in table.SOFTMAX_SATURATED])
    r = F.one_hot(torch.tensor([target for _, target in table.SOFTMAX_SATURATED]), 3).float()
    for gamma in [0.0, 0.3, 2.0]:
        for dtype in [torch.float32, torch.bfloat16]:
            out, grad = _fwd_bwd(fc.softmax_focal_loss, x.to(device, dtype), r.to(device), gamma, reduction="none",
                                 backend=backend)
            assert torch.isfinite(grad).all() and torch.isfinite(out).all() and out.abs().max() < 1e-2, (gamma, dtype)


@pytest.mark.parametrize("backend,device", backend_params())
def test_softmax_probabilities_layouts_and_unbatched(backend, device):
    x = random_logits((2, 6, 5, 4)).to(device)
    r = _probs((2, 6, 5, 4)).to(device)
    base, gbase = _fwd_bwd(fc.softmax_focal_loss, x, r, reduction="none", backend=backend)
    assert base.shape == (2, 5, 4)
    cl = x.to(memory_format=torch.channels_last)
    for name, (xv, rv) in {"channels_last/both": (cl, r.to(memory_format=torch.channels_last)),
                           "channels_last/logits": (cl, r),
                           "transposed": (x.transpose(2, 3).contiguous().transpose(2, 3), r)}.items():
        out, grad = _fwd_bwd(fc.softmax_focal_loss, xv, rv, reduction="none", backend=backend)
        torch.testing.assert_close(out, base, rtol=1e-6, atol=1e-7, msg=name)
        torch.testing.assert_close(grad, gbase, rtol=1e-6, atol=1e-7, msg=name)
    xu, ru = random_logits((5,)).to(device), _probs((5,)).to(device)
    a = fc.softmax_focal_loss(xu, ru, reduction="none", backend=backend)
    b = fc.softmax_focal_loss(xu[None], ru[None], reduction="none", backend=backend)
    assert a.shape == () and torch.equal(a, b[0])
    # empty: "sum" 0, "mean" NaN (as F.cross_entropy), a gradient of the logits' shape
    xe = torch.empty(0, 3, device=device, requires_grad=True)
    re = torch.empty(0, 3, device=device)
    assert fc.softmax_focal_loss(xe, re, reduction="sum", backend=backend).item() == 0
    loss = fc.softmax_focal_loss(xe, re, backend=backend)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(xe.detach(), re))
    loss.backward()
    assert xe.grad.shape == (0, 3)


@pytest.mark.parametrize("backend,device", backend_params())
def test_probability_rows_that_are_not_distributions_raise_on_the_cpu(backend, device):
    x = random_logits((6, 4, 2)).to(device)
    r = _probs((6, 4, 2)).to(device)
    neg = r.clone()
    neg[2, 0, 1], neg[2, 1, 1] = -0.1, neg[2, 1, 1] + 0.1 + neg[2, 0, 1]  # sums to 1, one entry < 0
    cases = {"negative": neg, "sum": r * 1.01, "percent": r * 100, "nan": r.masked_fill(r == r.max(), float("nan"))}
    for name, bad in cases.items():
        with pytest.raises(ValueError, match="target holds class probabilities .* not distributions"):
            fc.softmax_focal_loss(x, bad, backend=backend)
    # within the tolerance: accepted (rows that were rounded, e.g. to bfloat16)
    fc.softmax_focal_loss(x, r * (1 + 5e-4), backend=backend)
    fc.softmax_focal_loss(x, r.bfloat16(), backend=backend)
    mods = [fc.SoftmaxFocalLoss(backend=backend), fc.ClassBalancedFocalLoss([5, 1, 2, 9], backend=backend)]
    for m in mods:
        with pytest.raises(ValueError, match="not distributions"):
            m.to(device)(x, r * 2)


@pytest.mark.parametrize("backend,device", [p for p in fused_backend_params() if p.values[1] == "cpu"])
def test_probability_rows_that_are_not_distributions_give_nan_rows_in_the_kernel(backend, device):
    """What CUDA does without FASTCASCADE_CHECK (the CPU API raises first): NaN rows, the others untouched;
    every kernel path (CPU lanes, CPU rows for C > 64, float64; Triton tile and chunked)."""
    for shape, dtype in [((5, 3), torch.float32), ((5, 70), torch.float32), ((5, 3), torch.float64),
                         ((5, 4100), torch.float32), ((5, 3, 4), torch.bfloat16)]:
        x = random_logits(shape, dtype)
        r = _probs(shape, dtype=dtype)
        r[1] *= -1
        r[2] *= 1.5
        r[3, 0] = float("nan")
        loss, grad, _ = fc._ops.op("softmax_focal", backend)(x, r, None, 2.0, 0.1, -100, 0, True)
        want = reference.softmax_focal_loss(x.double(), r, 2.0, None, -100, 0.1, "none")
        assert torch.isnan(loss[1:4]).all() and torch.isnan(grad[1:4]).all() and torch.isnan(want[1:4]).all(), shape
        assert torch.isfinite(loss[[0, 4]]).all() and torch.isfinite(grad[[0, 4]]).all(), shape
        torch.testing.assert_close(loss[[0, 4]].double(), want[[0, 4]], rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-6)
        mean, _, scale = fc._ops.op("softmax_focal", backend)(x, r, None, 2.0, 0.1, -100, 1, True)
        assert torch.isnan(mean)


def test_probability_modules_match_functions():
    x = random_logits((40, 3))
    r = _probs((40, 3))
    counts = torch.tensor([30, 7, 3])
    m = fc.ClassBalancedFocalLoss(counts, beta=0.99, gamma=2.0, label_smoothing=0.1)
    torch.testing.assert_close(m(x, r), fc.softmax_focal_loss(x, r, 2.0, fc.class_balanced_weights(counts, 0.99),
                                                              label_smoothing=0.1))
    sm = fc.SoftmaxFocalLoss(gamma=1.0, reduction="none")
    torch.testing.assert_close(sm(x, r), reference.softmax_focal_loss(x, r, 1.0, reduction="none"))


# ---------------------------------------------------------------------------------------------
# sigmoid focal: targets outside [0, 1] are invalid input, the same on every backend


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[1] == "cpu"])
def test_sigmoid_targets_outside_0_1_give_nan_elements_in_the_kernel(backend, device):
    """What CUDA does without FASTCASCADE_CHECK (the CPU API raises first): NaN loss and gradient for those
    elements only, on every path (the reference included), whatever the label smoothing."""
    x = random_logits((4, 4))
    t = torch.rand(4, 4)
    t[0, 0], t[1, 2], t[3, 3], t[2, 1] = 2.0, -1.0, 1.0 + 1e-6, float("nan")
    bad = ~((t >= 0) & (t <= 1))
    for dtype, eps in [(torch.float32, 0.0), (torch.float64, 0.1), (torch.bfloat16, 0.0)]:
        xg = x.to(dtype).requires_grad_(True)
        if backend == "torch":
            loss = reference.sigmoid_focal_loss(xg, t, 0.25, 2.0, "none", eps)
            (grad,) = torch.autograd.grad(loss.sum(), xg)
        else:
            loss, grad, _ = fc._ops.op("sigmoid_focal", backend)(xg.detach(), t, 0.25, 2.0, eps, 0, True)
        assert torch.isnan(loss[bad]).all() and torch.isnan(grad[bad]).all(), (dtype, loss)
        assert torch.isfinite(loss[~bad]).all() and torch.isfinite(grad[~bad]).all(), (dtype, loss)
        want = reference.sigmoid_focal_loss(x.to(dtype).double(), t, 0.25, 2.0, "none", eps)
        # bf16: the reference computes in bf16 (8 bits of mantissa), so a loss near 0 carries ~1e-3 of rounding
        bf16 = dtype == torch.bfloat16
        torch.testing.assert_close(loss[~bad].double(), want[~bad], rtol=5e-2 if bf16 else 1e-5,
                                   atol=2e-3 if bf16 else 1e-6)
    u8 = torch.tensor([0, 1, 2, 255], dtype=torch.uint8)
    if backend != "torch":
        loss, _, _ = fc._ops.op("sigmoid_focal", backend)(torch.randn(4), u8, 0.25, 2.0, 0.0, 0, False)
    else:
        loss = reference.sigmoid_focal_loss(torch.randn(4), u8, 0.25, 2.0, "none")
    assert torch.isfinite(loss[:2]).all() and torch.isnan(loss[2:]).all()


# ---------------------------------------------------------------------------------------------
# gradcheck, opcheck, compile, determinism


@pytest.mark.parametrize("backend,device", [p for p in fused_backend_params() if p.values[1] == "cpu"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gradcheck_float64(backend, device, reduction):
    x = random_logits((2, 3, 5), torch.float64, scale=2.0).requires_grad_(True)
    ts = torch.rand(2, 3, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda z: fc.sigmoid_focal_loss(z, ts, 0.3, 1.5, reduction, 0.1, backend=backend), (x,))
    assert torch.autograd.gradcheck(
        lambda z: fc.sigmoid_focal_loss(z, ts, None, 0.5, reduction, backend=backend), (x,))
    tc = torch.tensor([[0, 2, 1, 4, 4], [3, -100, 0, 0, 1]])
    w = torch.rand(3, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda z: fc.softmax_focal_loss(z, tc.clamp(max=2).masked_fill(tc == -100, -100), 2.0, w, -100, 0.1,
                                        reduction, backend=backend), (x,))
    assert torch.autograd.gradcheck(
        lambda z: fc.softmax_focal_loss(z.transpose(1, 2).reshape(-1, 3), tc.reshape(-1).clamp(0, 2), 0.4,
                                        reduction=reduction, backend=backend), (x,))
    r = _probs((2, 3, 5), torch.Generator().manual_seed(8), torch.float64)
    assert torch.autograd.gradcheck(
        lambda z: fc.softmax_focal_loss(z, r, 2.0, w, label_smoothing=0.1, reduction=reduction, backend=backend), (x,))
    assert torch.autograd.gradcheck(
        lambda z: fc.softmax_focal_loss(z.transpose(1, 2).reshape(-1, 3), r.transpose(1, 2).reshape(-1, 3), 0.4,
                                        reduction=reduction, backend=backend), (x,))


def _opcheck_samples(device):
    gen = torch.Generator().manual_seed(3)
    x = random_logits((4, 3, 5), generator=gen).to(device)
    ts = torch.rand(4, 3, 5, generator=gen).to(device)
    tc = torch.randint(0, 3, (4, 5), generator=gen).to(device)
    w = (torch.rand(3, generator=gen) + 0.5).to(device)
    tr = _probs((4, 3, 5), gen).to(device)
    for red, ng in [(0, True), (1, True), (2, False)]:
        xs = x.clone().requires_grad_(ng)
        yield "sigmoid_focal", (xs, ts, 0.25, 2.0, 0.1, red, ng)
        yield "softmax_focal", (xs, tc, w, 2.0, 0.1, -100, red, ng)
        yield "softmax_focal", (xs[:, :, 0].contiguous(), tc[:, 0].contiguous(), None, 0.5, 0.0, 1, red, ng)
        yield "softmax_focal", (xs, tr, w, 2.0, 0.1, -100, red, ng)
        yield "softmax_focal", (xs[:, :, 0].contiguous(), tr[:, :, 0].contiguous().bfloat16(), None, 0.5, 0.0, -100,
                                red, ng)


# Under TRITON_INTERPRET=1, wrap_triton cannot trace interpreted kernels into a graph, so the
# AOT-dispatch check (and torch.compile) of the Triton ops runs only on a GPU.
INTERPRETED_AOT = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                     reason="AOT tracing of Triton kernels needs a GPU (not the interpreter)")


@pytest.mark.parametrize("backend,device", fused_backend_params())
def test_opcheck_schema_fake_autograd(backend, device):
    for name, args in _opcheck_samples(device):
        op = fc._ops.op(name, backend)
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("backend,device", [
    pytest.param(*p.values, marks=list(p.marks) + ([INTERPRETED_AOT] if p.values[0] == "triton" else []), id=p.id)
    for p in fused_backend_params()])
def test_opcheck_aot_dispatch(backend, device):
    for name, args in _opcheck_samples(device):
        op = fc._ops.op(name, backend)
        torch.library.opcheck(op, args, test_utils=("test_aot_dispatch_dynamic",))


@pytest.mark.parametrize("backend,device", [
    pytest.param(*p.values, marks=list(p.marks) + ([INTERPRETED_AOT] if p.values[0] == "triton" else []), id=p.id)
    for p in fused_backend_params()])
def test_compile_fullgraph(backend, device):
    torch._dynamo.reset()

    def step(x, ts, tc, w, tr):
        a = fc.sigmoid_focal_loss(x, ts, 0.25, 2.0, backend=backend)
        b = fc.softmax_focal_loss(x, tc, 2.0, w, label_smoothing=0.1, backend=backend)
        c = fc.sigmoid_focal_loss(x, ts, hard_negative_ratio=3.0, backend=backend)
        d = fc.softmax_focal_loss(x, tr, 2.0, w, label_smoothing=0.1, backend=backend)
        return a + b + c + d

    x = random_logits((16, 4, 3)).to(device)
    ts = (torch.rand(16, 4, 3) > 0.8).float().to(device)
    tc = torch.randint(0, 4, (16, 3)).to(device)
    w = torch.rand(4).to(device) + 0.5
    tr = _probs((16, 4, 3)).to(device)
    compiled = torch.compile(step, fullgraph=True)
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    le, lc = step(xe, ts, tc, w, tr), compiled(xc, ts, tc, w, tr)
    le.backward()
    lc.backward()
    torch.testing.assert_close(lc, le)
    torch.testing.assert_close(xc.grad, xe.grad)


@pytest.mark.parametrize("backend,device", fused_backend_params())
def test_deterministic(backend, device):
    n = 70001 if backend != "triton" or device != "cpu" else 9001
    x = random_logits((n,)).to(device)
    t = torch.rand(n).to(device)
    xs = random_logits((n // 7, 7)).to(device)
    tc = torch.randint(0, 7, (n // 7,)).to(device)
    tr = _probs((n // 7, 7)).to(device)
    runs = []
    threads = torch.get_num_threads()
    for nthreads in [1, max(2, threads)]:
        torch.set_num_threads(nthreads)
        try:
            for _ in range(2):
                a, ga = _fwd_bwd(fc.sigmoid_focal_loss, x, t, backend=backend)
                b, gb = _fwd_bwd(fc.softmax_focal_loss, xs, tc, backend=backend)
                c, gc = _fwd_bwd(fc.softmax_focal_loss, xs, tr, backend=backend)
                runs.append((a, ga, b, gb, c, gc))
        finally:
            torch.set_num_threads(threads)
    for r in runs[1:]:
        for u, v in zip(runs[0], r):
            assert torch.equal(u, v)


@pytest.mark.parametrize("backend,device", fused_backend_params())
def test_forward_only_when_no_grad(backend, device):
    x = random_logits((100,)).to(device)
    t = torch.rand(100).to(device)
    op = fc._ops.op("sigmoid_focal", backend)
    loss, grad, scale = op(x, t, 0.25, 2.0, 0.0, 1, False)
    assert grad.numel() == 0
    with torch.no_grad():
        l2 = fc.sigmoid_focal_loss(x.requires_grad_(True), t, backend=backend)
    assert l2.grad_fn is None
    torch.testing.assert_close(l2, loss)


# ---------------------------------------------------------------------------------------------
# layouts and empty inputs


@pytest.mark.parametrize("backend,device", fused_backend_params())
def test_layouts_give_the_same_result(backend, device):
    x = random_logits((2, 6, 5, 4)).to(device)
    ts = torch.rand(2, 6, 5, 4).to(device)
    tc = torch.randint(0, 6, (2, 5, 4)).to(device)
    base_s, gbase_s = _fwd_bwd(fc.sigmoid_focal_loss, x, ts, reduction="none", backend=backend)
    base_c, gbase_c = _fwd_bwd(fc.softmax_focal_loss, x, tc, reduction="none", backend=backend)
    cl = x.to(memory_format=torch.channels_last)
    variants = {
        "channels_last/both": (cl, ts.to(memory_format=torch.channels_last)),
        "channels_last/logits": (cl, ts),
        "transposed": (x.transpose(2, 3).contiguous().transpose(2, 3), ts),
    }
    for name, (xv, tv) in variants.items():
        out, grad = _fwd_bwd(fc.sigmoid_focal_loss, xv, tv, reduction="none", backend=backend)
        assert torch.equal(out, base_s) and torch.equal(grad, gbase_s), name
        out, grad = _fwd_bwd(fc.softmax_focal_loss, xv, tc, reduction="none", backend=backend)
        torch.testing.assert_close(out, base_c, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(grad, gbase_c, rtol=0, atol=0, msg=name)
    # size-1 dimensions: their strides place nothing, so they may differ between logits and targets
    one = random_logits((5, 1, 3, 3)).to(device)
    tone = torch.rand(5, 1, 3, 3).to(device)
    ref, gref = _fwd_bwd(fc.sigmoid_focal_loss, one, tone, reduction="none", backend=backend)
    out, grad = _fwd_bwd(fc.sigmoid_focal_loss, one.to(memory_format=torch.channels_last), tone, reduction="none",
                         backend=backend)
    assert torch.equal(out, ref) and torch.equal(grad, gref)
    col = random_logits((1, 5)).to(device)
    tcol = torch.rand(5, 1).to(device)
    out, grad = _fwd_bwd(fc.sigmoid_focal_loss, col.t(), tcol, reduction="none", backend=backend)
    ref, gref = _fwd_bwd(fc.sigmoid_focal_loss, col.t().contiguous(), tcol, reduction="none", backend=backend)
    assert torch.equal(out, ref) and torch.equal(grad, gref)
    # sliced (strided) inputs
    big = random_logits((8, 20)).to(device)
    tbig = torch.rand(8, 20).to(device)
    out, grad = _fwd_bwd(fc.sigmoid_focal_loss, big[::2, 3:17], tbig[::2, 3:17], reduction="sum", backend=backend)
    ref, gref = _fwd_bwd(fc.sigmoid_focal_loss, big[::2, 3:17].contiguous(), tbig[::2, 3:17].contiguous(),
                         reduction="sum", backend=backend)
    assert torch.equal(out, ref) and torch.equal(grad, gref)
    tcs = torch.randint(0, 20, (8,)).to(device)
    out, grad = _fwd_bwd(fc.softmax_focal_loss, big.t().contiguous().t(), tcs, backend=backend)
    ref, gref = _fwd_bwd(fc.softmax_focal_loss, big, tcs, backend=backend)
    assert torch.equal(out, ref) and torch.equal(grad, gref)


@pytest.mark.parametrize("backend,device", backend_params())
def test_empty_inputs_follow_torch(backend, device):
    x = torch.empty(table.EMPTY, device=device, requires_grad=True)
    t = torch.empty(table.EMPTY, device=device)
    assert fc.sigmoid_focal_loss(x, t, reduction="sum", backend=backend).item() == 0
    assert torch.isnan(fc.sigmoid_focal_loss(x, t, reduction="mean", backend=backend))
    assert fc.sigmoid_focal_loss(x, t, reduction="none", backend=backend).shape == table.EMPTY
    tc = torch.empty(table.EMPTY[0], dtype=torch.long, device=device)
    loss = fc.softmax_focal_loss(x, tc, backend=backend)
    assert torch.isnan(loss)
    loss.backward()
    assert x.grad.shape == table.EMPTY
    assert fc.softmax_focal_loss(x, tc, reduction="sum", backend=backend).item() == 0


def test_unbatched_softmax_matches_batched():
    x = random_logits((5,))
    t = torch.tensor(3)
    a = fc.softmax_focal_loss(x, t, reduction="none")
    b = fc.softmax_focal_loss(x[None], t[None], reduction="none")
    assert a.shape == () and torch.equal(a, b[0])


# ---------------------------------------------------------------------------------------------
# num_positives, hard negative mining


@pytest.mark.parametrize("backend,device", backend_params())
def test_num_positives_divides_the_sum(backend, device):
    x = random_logits((300,)).to(device)
    t = (torch.rand(300) > 0.9).float().to(device)
    npos = t.sum()
    a = fc.sigmoid_focal_loss(x, t, num_positives=npos, backend=backend)
    b = fc.sigmoid_focal_loss(x, t, reduction="sum", backend=backend) / npos
    torch.testing.assert_close(a, b)
    c = fc.sigmoid_focal_loss(x, t, num_positives=12.0, backend=backend)
    torch.testing.assert_close(c, b * npos / 12.0)


@pytest.mark.parametrize("backend,device", backend_params())
def test_hard_negative_mining_keeps_hardest(backend, device):
    gen = torch.Generator().manual_seed(5)
    x = random_logits((2, 500), generator=gen).to(device)
    t = (torch.rand(2, 500, generator=gen) > 0.95).float().to(device)
    xg = x.clone().requires_grad_(True)
    none = fc.sigmoid_focal_loss(xg, t, hard_negative_ratio=3.0, reduction="none", backend=backend)
    full = fc.sigmoid_focal_loss(x, t, reduction="none", backend=backend)
    pos = t > 0.5
    k = int(pos.sum()) * 3
    neg_losses = full[~pos]
    kept_neg = none[~pos] != 0
    assert int(kept_neg.sum()) == k
    # every kept negative is at least as hard as every dropped one
    assert neg_losses[kept_neg].min() >= neg_losses[~kept_neg].max()
    assert torch.equal(none[pos], full[pos])
    mean = fc.sigmoid_focal_loss(x, t, hard_negative_ratio=3.0, backend=backend)
    torch.testing.assert_close(mean, none.sum() / (int(pos.sum()) + k))
    none.sum().backward()
    assert (xg.grad[~pos][~kept_neg] == 0).all() and (xg.grad[pos] != 0).all()


# ---------------------------------------------------------------------------------------------
# class weights and modules


def test_class_balanced_weights():
    counts = torch.tensor([1000, 100, 10, 0])
    beta = 0.999
    w = fc.class_balanced_weights(counts, beta)
    raw = torch.tensor([(1 - beta) / (1 - beta**n) if n else 0.0 for n in counts.tolist()], dtype=torch.float64)
    torch.testing.assert_close(w, (raw * 4 / raw.sum()).float())
    assert w[3] == 0 and torch.isfinite(w).all() and abs(w.sum().item() - 4) < 1e-5
    assert w[2] > w[1] > w[0]
    # beta close to 1 (the default) is where 1 - beta**n cancels: still finite and ordered
    w = fc.class_balanced_weights([5_000_000, 10, 1], 0.9999)
    assert torch.isfinite(w).all() and w[2] > w[1] > w[0]
    torch.testing.assert_close(fc.class_balanced_weights([3, 7], 0.0), torch.ones(2))
    for bad in ([], [-1, 3], [0, 0]):
        with pytest.raises(ValueError, match="counts"):
            fc.class_balanced_weights(bad)
    with pytest.raises(ValueError, match="beta"):
        fc.class_balanced_weights([1, 2], 1.0)


def test_inverse_frequency_weights():
    w = fc.inverse_frequency_weights([100, 25, 0, 4], power=0.5)
    raw = torch.tensor([0.1, 0.2, 0.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(w, (raw * 4 / raw.sum()).float())
    w1 = fc.inverse_frequency_weights([10, 20], power=1.0)
    torch.testing.assert_close(w1, torch.tensor([4 / 3, 2 / 3]))


def test_modules_match_functions():
    x = random_logits((40, 3))
    t = torch.randint(0, 3, (40,))
    counts = torch.bincount(t, minlength=3)
    m = fc.ClassBalancedFocalLoss(counts, beta=0.99, gamma=2.0)
    torch.testing.assert_close(m(x, t), fc.softmax_focal_loss(x, t, 2.0, fc.class_balanced_weights(counts, 0.99)))
    assert "weight" in dict(m.named_buffers())
    sm = fc.SoftmaxFocalLoss(gamma=1.0, weight=torch.ones(3), label_smoothing=0.1)
    torch.testing.assert_close(sm(x, t), fc.softmax_focal_loss(x, t, 1.0, torch.ones(3), label_smoothing=0.1))
    xs, ts = random_logits((50,)), (torch.rand(50) > 0.5).float()
    fl = fc.FocalLoss(alpha=0.3, gamma=2.5)
    torch.testing.assert_close(fl(xs, ts), fc.sigmoid_focal_loss(xs, ts, 0.3, 2.5))
    torch.testing.assert_close(fl(xs, ts, num_positives=4.0), fc.sigmoid_focal_loss(xs, ts, 0.3, 2.5, num_positives=4.0))


# ---------------------------------------------------------------------------------------------
# bad input: clear errors before any kernel runs


@pytest.mark.parametrize("backend,device", backend_params())
def test_bad_inputs_raise_clear_errors(backend, device):
    x = random_logits((4, 3)).to(device)
    ts = torch.rand(4, 3).to(device)
    tc = torch.randint(0, 3, (4,)).to(device)
    cases = [
        (lambda: fc.sigmoid_focal_loss(x, ts[:, :2]), ValueError, "same shape"),
        (lambda: fc.sigmoid_focal_loss(x.long(), ts), ValueError, "logits must be a floating-point"),
        (lambda: fc.sigmoid_focal_loss(x, ts.long()), ValueError, "targets must be float, bool or uint8"),
        (lambda: fc.sigmoid_focal_loss(x, ts, gamma=-1.0), ValueError, "gamma"),
        (lambda: fc.sigmoid_focal_loss(x, ts, label_smoothing=1.0), ValueError, "label_smoothing"),
        (lambda: fc.sigmoid_focal_loss(x, ts, reduction="avg"), ValueError, "reduction"),
        (lambda: fc.sigmoid_focal_loss(x, ts, alpha=1.5), ValueError, "alpha"),
        (lambda: fc.sigmoid_focal_loss(x, ts, num_positives=3.0, reduction="sum"), ValueError, "num_positives"),
        (lambda: fc.softmax_focal_loss(x, tc.int()), ValueError, "int64"),
        (lambda: fc.softmax_focal_loss(x, tc[:3]), ValueError, "target must have shape"),
        (lambda: fc.softmax_focal_loss(x, tc + 3), ValueError, "outside"),
        (lambda: fc.softmax_focal_loss(x, tc - 5), ValueError, "outside"),
        (lambda: fc.softmax_focal_loss(x, tc, weight=torch.ones(4, device=device)), ValueError, "weight"),
        (lambda: fc.softmax_focal_loss(x, tc, weight=torch.ones(3, dtype=torch.long, device=device)), ValueError,
         "weight"),
        (lambda: fc.softmax_focal_loss(x, tc, gamma=-0.5), ValueError, "gamma"),
        (lambda: fc.softmax_focal_loss(x, tc, label_smoothing=-0.1), ValueError, "label_smoothing"),
        (lambda: fc.softmax_focal_loss(x, tc, reduction="batchmean"), ValueError, "reduction"),
        (lambda: fc.softmax_focal_loss(x[0, 0], tc), ValueError, "logits must be"),
        (lambda: fc.softmax_focal_loss(x[:, :0], tc), ValueError, "at least one class"),
        (lambda: fc.softmax_focal_loss(x, tc.bool()), ValueError, "int64 class indices or float class probabilities"),
        (lambda: fc.softmax_focal_loss(x, ts[:, :2]), ValueError, "target of class probabilities must have"),
        (lambda: fc.softmax_focal_loss(x, ts.t()), ValueError, "target of class probabilities must have"),
        (lambda: fc.softmax_focal_loss(x, ts[:, None]), ValueError, "target of class probabilities must have"),
        (lambda: fc.softmax_focal_loss(x[:, :0], ts[:, :0]), ValueError, "at least one class"),
        (lambda: fc.softmax_focal_loss(x, _probs((4, 3)).to(device), weight=torch.ones(2, device=device)), ValueError,
         "weight"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()
    with pytest.raises(ValueError, match="backend"):
        fc.sigmoid_focal_loss(x, ts, backend="fast")
    # targets outside [0, 1] are invalid: checked on the CPU (on CUDA only with FASTCASCADE_CHECK=1)
    for bad in (ts + 1.0, ts - 1.0, torch.full_like(ts, float("nan")), (ts * 3).to(torch.uint8)):
        with pytest.raises(ValueError, match=r"targets must lie in \[0, 1\]"):
            fc.sigmoid_focal_loss(x, bad, backend=backend)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTCASCADE_CHECK", "1")
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            fc.sigmoid_focal_loss(x, ts + 1.0, backend=backend)
    if device == "cpu":
        with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
            fc.sigmoid_focal_loss(x, ts, backend="cuda")
    if backend != "torch":
        with pytest.raises(ValueError, match="targets.requires_grad"):
            fc.sigmoid_focal_loss(x, ts.clone().requires_grad_(True), backend=backend)
        with pytest.raises(ValueError, match="weight.requires_grad"):
            fc.softmax_focal_loss(x, tc, weight=torch.ones(3, device=device, requires_grad=True), backend=backend)
        with pytest.raises(ValueError, match="target.requires_grad"):
            fc.softmax_focal_loss(x, _probs((4, 3)).to(device).requires_grad_(True), backend=backend)


def test_device_mismatch_is_caught_before_the_kernel():
    x = random_logits((4, 3))
    t = torch.rand(4, 3, device="meta")
    with pytest.raises(ValueError, match="same device"):
        fc.sigmoid_focal_loss(x, t)
    with pytest.raises(ValueError, match="same device"):
        fc.softmax_focal_loss(x, torch.zeros(4, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="weight must be on"):
        fc.softmax_focal_loss(x, torch.zeros(4, dtype=torch.long), weight=torch.ones(3, device="meta"))


def test_op_level_checks_for_direct_callers():
    x = random_logits((4, 3))
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.fastcascade.sigmoid_focal(x, torch.rand(4, 2), 0.25, 2.0, 0.0, 1, False)
    with pytest.raises(RuntimeError, match="identical strides"):
        torch.ops.fastcascade.sigmoid_focal(x, torch.rand(3, 4).t(), 0.25, 2.0, 0.0, 1, False)
    with pytest.raises(RuntimeError, match="reduction"):
        torch.ops.fastcascade.sigmoid_focal(x, torch.rand(4, 3), 0.25, 2.0, 0.0, 3, False)
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.fastcascade.softmax_focal(x, torch.zeros(4, dtype=torch.int32), None, 2.0, 0.0, -100, 1, False)
    with pytest.raises(RuntimeError, match="target of class probabilities must have the logits' shape"):
        torch.ops.fastcascade.softmax_focal(x, torch.rand(4, 2), None, 2.0, 0.0, -100, 1, False)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.fastcascade.softmax_focal(x, _probs((4, 3)), torch.ones(2), 2.0, 0.0, -100, 1, False)


@pytest.mark.parametrize("backend,device", [p for p in fused_backend_params() if p.values[0] != "triton"])
def test_zero_classes_make_every_counted_row_nan(backend, device):
    """The C++ ops called directly (the API refuses C = 0; the Triton op refuses it too)."""
    x = torch.empty(4, 0, device=device)
    t = torch.tensor([0, -100, 3, 1], device=device)
    loss, grad, _ = fc._ops.op("softmax_focal", backend)(x, t, None, 2.0, 0.0, -100, 0, True)
    assert torch.isnan(loss[[0, 2, 3]]).all() and loss[1] == 0 and grad.shape == (4, 0)


def test_out_of_range_targets_give_nan_rows_in_the_kernel():
    """What CUDA does without FASTCASCADE_CHECK (the CPU API raises first): NaN rows, no memory access."""
    x = random_logits((4, 3))
    t = torch.tensor([0, 7, -3, 1])
    loss, grad, _ = torch.ops.fastcascade.softmax_focal(x, t, torch.ones(3), 2.0, 0.0, -100, 0, True)
    assert torch.isnan(loss[1:3]).all() and torch.isfinite(loss[[0, 3]]).all()
    assert torch.isnan(grad[1:3]).all() and torch.isfinite(grad[[0, 3]]).all()


def test_cuda_without_cuda_kernels_says_how_to_rebuild(monkeypatch):
    monkeypatch.setattr(fc._ops, "CUDA_COMPILED", False)
    with pytest.raises(RuntimeError, match="FASTCASCADE_FORCE_CUDA=1 pip install"):
        fc._ops.resolve_backend("cuda", torch.device("cuda"))
    assert fc._ops.resolve_backend("auto", torch.device("cuda")) in ("triton", "torch")


def test_env_backend_replaces_auto(monkeypatch):
    monkeypatch.setenv("FASTCASCADE_BACKEND", "torch")
    assert fc._ops.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert fc._ops.resolve_backend("cpu", torch.device("cpu")) == "cpu"
    monkeypatch.setenv("FASTCASCADE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend"):
        fc.sigmoid_focal_loss(random_logits((3,)), torch.rand(3))


def test_rel_err_helper_rejects_nan():
    with pytest.raises(AssertionError, match="NaN"):
        rel_err(torch.tensor([float("nan")]), torch.tensor([1.0]))


# ---------------------------------------------------------------------------------------------
# GPU only: no host sync, and out-of-range targets never break the CUDA context


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_paths_never_sync_the_host(backend):
    dev = "cuda"
    x = random_logits((64, 1000)).to(dev).requires_grad_(True)
    t = (torch.rand(64, 1000, device=dev) > 0.9).float()
    xs = random_logits((4096, 10)).to(dev).requires_grad_(True)
    tc = torch.randint(0, 10, (4096,), device=dev)
    w = torch.rand(10, device=dev) + 0.5
    tr = torch.softmax(torch.randn(4096, 10, device=dev), 1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fc.sigmoid_focal_loss(x, t, backend=backend).backward()
        fc.sigmoid_focal_loss(x, t, num_positives=t.sum(), backend=backend).backward()
        fc.sigmoid_focal_loss(x, t, hard_negative_ratio=3.0, backend=backend).backward()
        fc.softmax_focal_loss(xs, tc, 2.0, w, label_smoothing=0.1, backend=backend).backward()
        fc.softmax_focal_loss(xs, tc, 2.0, reduction="none", backend=backend).sum().backward()
        fc.softmax_focal_loss(xs, tr, 2.0, w, label_smoothing=0.1, backend=backend).backward()
        fc.softmax_focal_loss(xs, tr, 2.0, reduction="none", backend=backend).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_sum_does_not_depend_on_alignment(backend):
    big = random_logits((1 << 16) + 1).cuda()
    tbig = torch.rand((1 << 16) + 1, device="cuda")
    a = fc.sigmoid_focal_loss(big[1:], tbig[1:], reduction="sum", backend=backend)  # 4-byte offset: scalar loads
    b = fc.sigmoid_focal_loss(big[1:].clone(), tbig[1:].clone(), reduction="sum", backend=backend)
    assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_out_of_range_targets_give_nan_rows(backend, monkeypatch):
    x = random_logits((6, 4)).cuda()
    t = torch.tensor([0, 4, -7, 3, 1000000, 2], device="cuda")
    loss = fc.softmax_focal_loss(x, t, reduction="none", backend=backend)
    torch.cuda.synchronize()  # the context is alive
    bad = torch.tensor([False, True, True, False, True, False])
    assert torch.isnan(loss.cpu()[bad]).all() and torch.isfinite(loss.cpu()[~bad]).all()
    assert torch.isnan(fc.softmax_focal_loss(x, t, backend=backend)).item()
    monkeypatch.setenv("FASTCASCADE_CHECK", "1")
    with pytest.raises(ValueError, match="outside"):
        fc.softmax_focal_loss(x, t, backend=backend)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_invalid_targets_give_nan_without_a_sync(backend, monkeypatch):
    """Probability rows that are not distributions and sigmoid targets outside [0, 1]: NaN rows / elements,
    no host sync, the context alive; FASTCASCADE_CHECK=1 raises instead."""
    x = random_logits((6, 4)).cuda()
    r = torch.softmax(torch.randn(6, 4), 1)
    r[1] *= 2
    r[4, 0] = -0.5
    r = r.cuda()
    t = torch.rand(6, 4)
    t[2, 3], t[5, 0] = 2.0, -1.0
    t = t.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = fc.softmax_focal_loss(x, r, reduction="none", backend=backend)
        mean = fc.softmax_focal_loss(x, r, backend=backend)
        sig = fc.sigmoid_focal_loss(x, t, reduction="none", backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    bad = torch.tensor([False, True, False, False, True, False])
    assert torch.isnan(loss.cpu()[bad]).all() and torch.isfinite(loss.cpu()[~bad]).all() and torch.isnan(mean.cpu())
    bad_t = ~((t >= 0) & (t <= 1)).cpu()
    assert torch.isnan(sig.cpu()[bad_t]).all() and torch.isfinite(sig.cpu()[~bad_t]).all()
    monkeypatch.setenv("FASTCASCADE_CHECK", "1")
    with pytest.raises(ValueError, match="not distributions"):
        fc.softmax_focal_loss(x, r, backend=backend)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 1\]"):
        fc.sigmoid_focal_loss(x, t, backend=backend)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_triton_losses_run_on_the_tensors_device():
    """Triton launches on the current device: a loss of tensors on cuda:1 while cuda:0 is current must
    still be computed on cuda:1 (the op guards the launch with the tensors' device)."""
    x = random_logits((5000,))
    t = (torch.rand(5000, generator=torch.Generator().manual_seed(2)) < 0.3).float()
    xs = random_logits((3000, 10))
    ts = torch.randint(0, 10, (3000,), generator=torch.Generator().manual_seed(3))
    with torch.cuda.device(0):
        out, grad = _fwd_bwd(fc.sigmoid_focal_loss, x.to("cuda:1"), t.to("cuda:1"), backend="triton")
        out_s, grad_s = _fwd_bwd(fc.softmax_focal_loss, xs.to("cuda:1"), ts.to("cuda:1"), 2.0, backend="triton")
        torch.cuda.synchronize(1)
    ref, ref_grad = _fwd_bwd(fc.sigmoid_focal_loss, x, t, backend="torch")
    ref_s, ref_grad_s = _fwd_bwd(fc.softmax_focal_loss, xs, ts, 2.0, backend="torch")
    assert grad.device == torch.device("cuda:1")
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.cpu(), ref_grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out_s.cpu(), ref_s, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_s.cpu(), ref_grad_s, rtol=1e-5, atol=1e-7)
