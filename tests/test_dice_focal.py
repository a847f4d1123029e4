"""Fused Dice + softmax focal loss: every backend against fastcascade.reference, and MONAI where it agrees."""

import os

import pytest
import torch
from conftest import (
    assert_within_model,
    backend_params,
    fused_backend_params,
    random_logits,
    reference_errors,
    seeded,
)

import fastcascade as fc
from fastcascade import reference
from fastcascade.selftest.cases import dice_focal as table
from fastcascade.selftest.cases import for_tests

DTYPES = list(table.DTYPES)


def _fwd_bwd(fn, logits, *args, **kw):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, *args, **kw)
    # an upstream gradient that is not 1 (exact in bf16), so a backward that ignores it fails
    (loss * 1.375).backward()
    return loss.detach(), x.grad


def _case(shape, gen, ignore_index=None, C_from=0):
    C = shape[1]
    x = random_logits(shape, generator=gen)
    t = torch.randint(C_from, C, (shape[0],) + shape[2:], generator=gen)
    if ignore_index is not None:
        t[torch.rand(t.shape, generator=gen) < 0.2] = ignore_index
        t.view(-1)[0] = 0  # at least one counted pixel ("mean" over none is tested apart)
    return x, t


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [r.shape for r in for_tests(table.SHAPES)], ids=str)
def test_matches_reference(backend, device, dtype, shape):
    gen = seeded("dice", shape)
    C = shape[1]
    for wgt, inc_bg, ignore, batch, smooth, gamma, ld, lf in table.OPTIONS:
        if C == 1:
            if not inc_bg:
                continue  # needs 2 classes (refused, tested in bad input)
            gamma = max(gamma, 1.0)  # the reference's (1 - p)^gamma has a NaN gradient at p = 1 for gamma < 1
        x, t = _case(shape, gen, ignore)
        if ignore is not None and 0 <= ignore < C:
            t[t == ignore] = 0  # an in-range ignore_index: its pixels are ignored, keep some counted
            t.view(-1)[1:3] = ignore
        w = torch.rand(C, generator=gen) + 0.5 if wgt else None
        kw = dict(weight=w, gamma=gamma, lambda_dice=ld, lambda_focal=lf, smooth=smooth,
                  include_background=inc_bg, ignore_index=ignore, batch_dice=batch)

        def ref(x):
            return _fwd_bwd(reference.dice_focal_loss, x, t, **kw)  # noqa: B023

        l64, g64 = ref(x.double())
        lerr, gerr = reference_errors(ref, [x.double()], dtype, generator=gen)
        kwd = dict(kw, weight=None if w is None else w.to(device))
        out, grad = _fwd_bwd(fc.dice_focal_loss, x.to(device, dtype), t.to(device), backend=backend, **kwd)
        assert out.dtype == dtype and out.shape == () and grad.shape == x.shape
        what = f"{backend} {dtype} {shape} {kw | dict(weight=wgt)}"
        assert_within_model(out, l64, lerr, "loss " + what)
        assert_within_model(grad, g64, gerr, "grad " + what)


def test_reference_matches_its_definition():
    """The reference against the formula spelled out with loops (per class, per image), no fused tricks."""
    gen = torch.Generator().manual_seed(5)
    x = random_logits((3, 4, 5, 6), torch.float64, generator=gen)
    t = torch.randint(0, 4, (3, 5, 6), generator=gen)
    t[0, 0, :3] = 7  # ignored
    w = torch.rand(4, generator=gen, dtype=torch.float64) + 0.5
    p = torch.softmax(x, 1)
    for batch in (True, False):
        groups = [slice(0, 3)] if batch else [slice(b, b + 1) for b in range(3)]
        dices = []
        for g in groups:
            num = den = 0.0
            for c in range(1, 4):  # include_background=False
                keep = t[g] != 7
                pc = p[g, c][keep]
                yc = (t[g][keep] == c).double()
                d = 1 - (2 * (pc * yc).sum() + 0.5) / (pc.sum() + yc.sum() + 0.5)
                num, den = num + w[c] * d, den + w[c]
            dices.append(num / den)
        dice = torch.stack(dices).mean()
        focal = fc.softmax_focal_loss(x, t, 2.0, w, ignore_index=7, backend="torch")
        want = 0.25 * dice + 0.75 * focal
        got = reference.dice_focal_loss(x, t, w, 2.0, 0.25, 0.75, 0.5, False, 7, batch)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend,device", fused_backend_params())
def test_confident_and_saturated_logits(backend, device):
    """Logits up to +-1e4 and confident pixels: finite and close to the float64 reference."""
    gen = torch.Generator().manual_seed(2)
    x = random_logits((2, 5, 8, 8), torch.float64, generator=gen) * 30
    x[0, :, 0, 0] = torch.tensor([1e4, -1e4, 0.0, 3.0, -2.0], dtype=torch.float64)
    t = torch.randint(0, 5, (2, 8, 8), generator=gen)
    for gamma in (0.0, 0.5, 2.0, 5.0):
        l64, g64 = _fwd_bwd(reference.dice_focal_loss, x, t, gamma=max(gamma, 1.0))
        out, grad = _fwd_bwd(fc.dice_focal_loss, x.float().to(device), t.to(device), gamma=max(gamma, 1.0),
                             backend=backend)
        assert torch.isfinite(out) and torch.isfinite(grad).all()
        torch.testing.assert_close(out.double().cpu(), l64, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grad.double().cpu(), g64, rtol=1e-3, atol=1e-6)
        out, grad = _fwd_bwd(fc.dice_focal_loss, x.float().to(device), t.to(device), gamma=gamma, backend=backend)
        assert torch.isfinite(out) and torch.isfinite(grad).all()


@pytest.mark.parametrize("backend,device", backend_params())
def test_every_pixel_ignored(backend, device):
    """Focal mean over nothing is NaN with a zero gradient (torch's rule); Dice alone stays finite."""
    x = random_logits((2, 3, 4, 4)).to(device)
    t = torch.full((2, 4, 4), 9, device=device)
    out, grad = _fwd_bwd(fc.dice_focal_loss, x, t, ignore_index=9, backend=backend)
    assert torch.isnan(out)
    out, grad = _fwd_bwd(fc.dice_focal_loss, x, t, ignore_index=9, lambda_focal=0.0, backend=backend)
    assert out.item() == 0.0 and torch.count_nonzero(grad) == 0  # I = S = 0: dice_c = 1 - smooth / smooth


def test_lambdas_split_the_terms():
    gen = torch.Generator().manual_seed(4)
    x, t = _case((2, 4, 6, 6), gen)
    both = fc.dice_focal_loss(x, t, lambda_dice=0.3, lambda_focal=0.9)
    dice = fc.dice_focal_loss(x, t, lambda_dice=1.0, lambda_focal=0.0)
    focal = fc.dice_focal_loss(x, t, lambda_dice=0.0, lambda_focal=1.0)
    torch.testing.assert_close(both, 0.3 * dice + 0.9 * focal)
    torch.testing.assert_close(focal, fc.softmax_focal_loss(x, t, 2.0))
    assert 0 < dice < 1


# ---------------------------------------------------------------------------------------------
# MONAI


def _monai_cases():
    # (C, include_background, batch_dice, smooth, weighted, ignore_index)
    return [(4, True, False, 1e-5, False, None), (5, False, True, 1.0, True, None), (3, True, True, 0.5, False, 2),
            (2, True, False, 1.0, True, 7)]


@pytest.mark.parametrize("backend,device", fused_backend_params())
def test_matches_monai(backend, device):
    """Where the options coincide (see dice_focal_loss's docstring): the Dice term equals MONAI's DiceLoss
    and DiceFocalLoss(lambda_focal=0); the focal term equals C x MONAI's FocalLoss(use_softmax=True)."""
    monai = pytest.importorskip("monai", reason="monai is not installed (pip install monai)")
    from monai.losses import DiceFocalLoss as MonaiDiceFocal
    from monai.losses import DiceLoss as MonaiDice
    from monai.losses import FocalLoss as MonaiFocal

    gen = torch.Generator().manual_seed(11)
    for C, inc_bg, batch, smooth, weighted, ignore in _monai_cases():
        x, t = _case((3, C, 9, 10), gen, ignore)
        n_inc = C if inc_bg else C - 1
        w = torch.rand(n_inc, generator=gen, dtype=torch.float64) + 0.5 if weighted else None
        w = None if w is None else w * (n_inc / w.sum())  # MONAI's mean_c(w_c d_c) = our sum w d / sum w
        ours_w = None if w is None else (w if inc_bg else torch.cat([torch.ones(1, dtype=w.dtype), w])).float()
        ours = fc.dice_focal_loss(x.to(device), t.to(device), None if ours_w is None else ours_w.to(device),
                                  lambda_dice=1.0, lambda_focal=0.0, smooth=smooth, include_background=inc_bg,
                                  ignore_index=ignore, batch_dice=batch, backend=backend).cpu()
        dice = MonaiDice(include_background=inc_bg, to_onehot_y=True, softmax=True, smooth_nr=smooth,
                         smooth_dr=smooth, batch=batch, weight=None if w is None else w.float(),
                         ignore_index=ignore)(x, t[:, None])
        torch.testing.assert_close(ours, dice, rtol=1e-5, atol=1e-6)
        if ignore is None:
            combined = MonaiDiceFocal(include_background=inc_bg, to_onehot_y=True, softmax=True, smooth_nr=smooth,
                                      smooth_dr=smooth, batch=batch, weight=None if w is None else w.float(),
                                      lambda_dice=1.0, lambda_focal=0.0)(x, t[:, None])
            torch.testing.assert_close(ours, combined, rtol=1e-5, atol=1e-6)
        if ignore is None and not weighted:  # MONAI's FocalLoss has no ignore_index and divides by the count
            ours_focal = fc.dice_focal_loss(x.to(device), t.to(device), gamma=1.5, lambda_dice=0.0,
                                            lambda_focal=1.0, backend=backend).cpu()
            focal = MonaiFocal(to_onehot_y=True, use_softmax=True, gamma=1.5)(x, t[:, None])
            torch.testing.assert_close(ours_focal, C * focal, rtol=1e-5, atol=1e-6)
    assert monai.__version__


# ---------------------------------------------------------------------------------------------
# gradcheck, opcheck, compile, determinism


@pytest.mark.parametrize("backend,device", [p for p in fused_backend_params() if p.values[1] == "cpu"])
@pytest.mark.parametrize("batch_dice", [True, False])
def test_gradcheck_float64(backend, device, batch_dice):
    gen = torch.Generator().manual_seed(6)
    x = random_logits((2, 3, 4, 5), torch.float64, scale=2.0, generator=gen).requires_grad_(True)
    t = torch.randint(0, 3, (2, 4, 5), generator=gen)
    t[0, 0, :2] = -1
    w = torch.rand(3, dtype=torch.float64, generator=gen) + 0.5
    assert torch.autograd.gradcheck(
        lambda z: fc.dice_focal_loss(z, t, w, 1.5, 0.6, 0.4, 0.5, False, -1, batch_dice, backend=backend), (x,))
    assert torch.autograd.gradcheck(
        lambda z: fc.dice_focal_loss(z, t.clamp(min=0), None, 2.0, batch_dice=batch_dice, backend=backend), (x,))


def _opcheck_samples(device):
    gen = torch.Generator().manual_seed(3)
    x = random_logits((2, 4, 30), generator=gen).to(device)
    t = torch.randint(0, 4, (2, 30), generator=gen).to(device)
    w = (torch.rand(4, generator=gen) + 0.5).to(device)
    for ng in (True, False):
        xs = x.clone().requires_grad_(ng)
        yield (xs, t, w, 2.0, 1.0, 0.5, 0.5, 1, False, True)
        yield (xs, t, None, 0.5, 1e-5, 1.0, 0.2, fc._ops.NO_IGNORE_INDEX, True, False)


INTERPRETED_AOT = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                     reason="AOT tracing of Triton kernels needs a GPU (not the interpreter)")


@pytest.mark.parametrize("backend,device", fused_backend_params())
def test_opcheck_schema_fake_autograd(backend, device):
    op = fc._ops.op("dice_focal", backend)
    for args in _opcheck_samples(device):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("backend,device", [
    pytest.param(*p.values, marks=list(p.marks) + ([INTERPRETED_AOT] if p.values[0] == "triton" else []), id=p.id)
    for p in fused_backend_params()])
def test_opcheck_aot_dispatch(backend, device):
    op = fc._ops.op("dice_focal", backend)
    for args in _opcheck_samples(device):
        torch.library.opcheck(op, args, test_utils=("test_aot_dispatch_dynamic",))


@pytest.mark.parametrize("backend,device", [
    pytest.param(*p.values, marks=list(p.marks) + ([INTERPRETED_AOT] if p.values[0] == "triton" else []), id=p.id)
    for p in fused_backend_params()])
def test_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    crit = fc.DiceFocalLoss(torch.rand(4) + 0.5, include_background=False, ignore_index=255, backend=backend).to(device)

    def step(x, t):
        return crit(x, t) + fc.dice_focal_loss(x, t, batch_dice=False, ignore_index=255, backend=backend)

    gen = torch.Generator().manual_seed(8)
    x, t = _case((2, 4, 7, 6), gen, 255)
    x, t = x.to(device), t.to(device)
    compiled = torch.compile(step, fullgraph=True)
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    le, lc = step(xe, t), compiled(xc, t)
    le.backward()
    lc.backward()
    torch.testing.assert_close(lc, le)
    torch.testing.assert_close(xc.grad, xe.grad)


@pytest.mark.parametrize("backend,device", fused_backend_params())
def test_deterministic(backend, device):
    shape = (3, 6, 97, 83) if backend != "triton" or device != "cpu" else (2, 6, 33, 31)
    gen = torch.Generator().manual_seed(9)
    x, t = _case(shape, gen, 255)
    x, t = x.to(device), t.to(device)
    runs = []
    threads = torch.get_num_threads()
    for nthreads in [1, max(2, threads)]:
        torch.set_num_threads(nthreads)
        try:
            for batch in (True, False):
                runs.append(_fwd_bwd(fc.dice_focal_loss, x, t, ignore_index=255, batch_dice=batch, backend=backend))
        finally:
            torch.set_num_threads(threads)
    for a, b in [(runs[0], runs[2]), (runs[1], runs[3])]:
        for u, v in zip(a, b):
            assert torch.equal(u, v)


@pytest.mark.parametrize("backend,device", fused_backend_params())
def test_layouts_give_the_same_result(backend, device):
    gen = torch.Generator().manual_seed(10)
    x, t = _case((2, 5, 6, 7), gen)
    x, t = x.to(device), t.to(device)
    base, gbase = _fwd_bwd(fc.dice_focal_loss, x, t, backend=backend)
    for xv in (x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        out, grad = _fwd_bwd(fc.dice_focal_loss, xv, t, backend=backend)
        torch.testing.assert_close(out, base, rtol=0, atol=0)
        torch.testing.assert_close(grad, gbase, rtol=0, atol=0)


def test_module_matches_function():
    gen = torch.Generator().manual_seed(12)
    x, t = _case((2, 3, 5, 5), gen, 255)
    w = [0.5, 1.0, 2.0]
    m = fc.DiceFocalLoss(w, gamma=1.0, lambda_dice=0.2, lambda_focal=0.8, smooth=0.1, include_background=False,
                         ignore_index=255, batch_dice=False)
    assert m.weight.dtype == torch.float32 and "lambda_dice=0.2" in repr(m)
    torch.testing.assert_close(m(x, t), fc.dice_focal_loss(x, t, torch.tensor(w), 1.0, 0.2, 0.8, 0.1, False, 255,
                                                           False))


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("backend,device", backend_params())
def test_bad_inputs_raise_clear_errors(backend, device):
    x = random_logits((2, 3, 4, 4)).to(device)
    t = torch.randint(0, 3, (2, 4, 4)).to(device)
    f = fc.dice_focal_loss
    cases = [
        (lambda: f(x, t.int(), backend=backend), "int64"),
        (lambda: f(x, t[:, :3], backend=backend), "target must have shape"),
        (lambda: f(x[:, :, 0, 0], t[:, 0, 0], backend=backend), "at least one spatial dim"),
        (lambda: f(x.long(), t, backend=backend), "logits must be a floating-point"),
        (lambda: f(x, t + 3, backend=backend), "outside"),
        (lambda: f(x, t - 1, backend=backend), "outside"),
        (lambda: f(x, t - 1, ignore_index=-2, backend=backend), "outside"),
        (lambda: f(x, t, weight=torch.ones(4, device=device), backend=backend), "weight"),
        (lambda: f(x, t, gamma=-1.0, backend=backend), "gamma"),
        (lambda: f(x, t, lambda_dice=-0.1, backend=backend), "lambda_dice"),
        (lambda: f(x, t, lambda_focal=-1.0, backend=backend), "lambda_focal"),
        (lambda: f(x, t, smooth=-1e-5, backend=backend), "smooth"),
        (lambda: f(x, t, smooth=float("nan"), backend=backend), "smooth"),
        (lambda: f(x, t, reduction="sum", backend=backend), "reduction must be 'mean'"),
        (lambda: f(x, t, reduction="avg", backend=backend), "reduction"),
        (lambda: f(x[:, :1], t.clamp(max=0), include_background=False, backend=backend), "at least 2 classes"),
        (lambda: f(x[:, :0], t, backend=backend), "at least one class"),
        (lambda: f(x, t, ignore_index=1.5, backend=backend), "ignore_index"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()
    f(x, t - 1, ignore_index=-1, backend=backend)  # ignored, not out of range
    with pytest.raises(ValueError, match="backend"):
        f(x, t, backend="fast")
    if backend != "torch":
        with pytest.raises(ValueError, match="weight.requires_grad"):
            f(x, t, weight=torch.ones(3, device=device, requires_grad=True), backend=backend)


def test_out_of_range_targets_give_nan_in_the_kernel():
    """The op called directly (as on CUDA, where targets are not read back): NaN loss and gradient rows."""
    x = random_logits((1, 3, 5)).requires_grad_(True)
    t = torch.tensor([[0, 5, 1, -100, 2]])
    for lf in (0.5, 0.0):
        loss, *_ = torch.ops.fastcascade.dice_focal(x, t, None, 2.0, 1.0, 0.5, lf, -100, True, True)
        assert torch.isnan(loss)
        loss.backward()
        assert torch.isnan(x.grad[0, :, 1]).all() and (x.grad[0, :, 3] == 0).all()
        x.grad = None


def test_op_level_checks_for_direct_callers():
    x = random_logits((2, 3, 5))
    t = torch.zeros(2, 5, dtype=torch.long)
    op = torch.ops.fastcascade.dice_focal
    with pytest.raises(RuntimeError, match="int64"):
        op(x, t.int(), None, 2.0, 1.0, 0.5, 0.5, -100, True, True)
    with pytest.raises(RuntimeError, match="target must have shape"):
        op(x, t[:, :4], None, 2.0, 1.0, 0.5, 0.5, -100, True, True)
    with pytest.raises(RuntimeError, match="logits must be"):
        op(x[0], t, None, 2.0, 1.0, 0.5, 0.5, -100, True, True)
    with pytest.raises(RuntimeError, match="weight"):
        op(x, t, torch.ones(2), 2.0, 1.0, 0.5, 0.5, -100, True, True)
