"""Numerics every backend promises: NaN propagation through the adapters, float64 gradients, infinite
and extreme logits in the focal losses (the reference included), and the argument checks around them."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import backend_params, fused_backend_params

import fastcascade as fc
from fastcascade import _ops, reference
from fastcascade.selftest.cases import focal as focal_table

INF = float("inf")


def _grad(fn, x, *args, **kw):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, *args, **kw)
    (g,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), g


# ---------------------------------------------------------------------------------------------
# ReLU adapters: NaN propagates as torch.relu propagates it (forward and backward)


def _adapter_grads(fn, x, params, g):
    x = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in params]
    y = fn(x, *params)
    grads = torch.autograd.grad((y * g).sum(), [x] + params)
    return [y.detach()] + list(grads)


def _assert_same_nan_pattern(outs, refs, what):
    names = ["y", "grad_x", "grad_down_w", "grad_down_b", "grad_up_w", "grad_up_b", "grad_scale"]
    for name, a, b in zip(names, outs, refs):
        assert a.shape == b.shape, (what, name)
        assert torch.equal(torch.isnan(a), torch.isnan(b)), (what, name, torch.isnan(a).sum(), torch.isnan(b).sum())
        ok = ~torch.isnan(b)
        torch.testing.assert_close(a[ok], b[ok], rtol=1e-9, atol=1e-9, msg=f"{what} {name}")


def _adapter_inputs(C, r, gen):
    w = [torch.randn(r, C, generator=gen, dtype=torch.float64) * 0.5, torch.randn(r, generator=gen, dtype=torch.float64),
         torch.randn(C, r, generator=gen, dtype=torch.float64) * 0.5, torch.randn(C, generator=gen, dtype=torch.float64)]
    return w + [torch.tensor(0.7, dtype=torch.float64)]


@pytest.mark.parametrize("backend,device", fused_backend_params())
@pytest.mark.parametrize("kind", ["pooled", "pixel"])
def test_relu_adapter_propagates_nan_like_the_reference(backend, device, kind):
    gen = torch.Generator().manual_seed(3)
    B, C, H, W, r = 3, 6, 4, 5, 4
    params = [p.to(device) for p in _adapter_inputs(C, r, gen)]
    op = _ops.op(f"{kind}_adapter", backend)
    code = _ops.ADAPTER_ACTIVATION_CODES["relu"]
    ref_fn = getattr(reference, f"{kind}_adapter")

    def fused(x, *p):
        y = op(x, *p[:5], code, 0.0, 0)
        return y[0] if kind == "pooled" else y

    def ref(x, *p):
        return ref_fn(x, *p[:4], "relu", p[4], **({} if kind == "pooled" else {"channel_dim": 1}))

    for fmt in [torch.contiguous_format, torch.channels_last]:
        x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
        x[1, 2, 3, 1] = float("nan")  # one NaN feature of one pixel of sample 1
        x = x.to(device).contiguous(memory_format=fmt)
        g = (torch.rand(B, C, H, W, generator=gen, dtype=torch.float64) + 0.5).to(device)
        outs = _adapter_grads(fused, x, params, g)
        refs = _adapter_grads(ref, x, params, g)
        # the reference: pooled makes all of sample 1 NaN, pixel all channels of that pixel
        if kind == "pooled":
            assert torch.isnan(refs[0][1]).all() and not torch.isnan(refs[0][[0, 2]]).any()
        else:
            assert torch.isnan(refs[0][1, :, 3, 1]).all() and int(torch.isnan(refs[0]).sum()) == C
        _assert_same_nan_pattern(outs, refs, f"{backend} {kind} {fmt}")


# ---------------------------------------------------------------------------------------------
# float64 inputs get float64-accurate gradients ("mean" normaliser in float64)


@pytest.mark.parametrize("backend,device", backend_params())
def test_float64_mean_gradients_are_float64_accurate(backend, device):
    gen = torch.Generator().manual_seed(5)
    N = 42  # 1/42 is not a float32 number: a float32 normaliser is off by ~1e-8 relative
    x = torch.randn(N, 3, generator=gen, dtype=torch.float64).to(device)
    t = torch.randint(0, 3, (N,), generator=gen).to(device)
    _, g = _grad(fc.softmax_focal_loss, x, t, gamma=0.0, backend=backend)
    _, g_ref = _grad(F.cross_entropy, x, t)
    torch.testing.assert_close(g, g_ref, rtol=1e-13, atol=1e-16)
    w = torch.rand(3, generator=gen, dtype=torch.float64).to(device) + 0.5
    _, g = _grad(fc.softmax_focal_loss, x, t, gamma=0.0, weight=w, label_smoothing=0.1, backend=backend)
    _, g_ref = _grad(F.cross_entropy, x, t, weight=w, label_smoothing=0.1)
    torch.testing.assert_close(g, g_ref, rtol=1e-13, atol=1e-16)

    r = torch.softmax(torch.randn(N, 3, generator=gen, dtype=torch.float64), 1).to(device)
    _, g = _grad(fc.softmax_focal_loss, x, r, gamma=0.0, weight=w, label_smoothing=0.1, backend=backend)
    _, g_ref = _grad(F.cross_entropy, x, r, weight=w, label_smoothing=0.1)
    torch.testing.assert_close(g, g_ref, rtol=1e-13, atol=1e-16)

    xs = torch.randn(N, generator=gen, dtype=torch.float64).to(device)
    ts = torch.rand(N, generator=gen, dtype=torch.float64).to(device)
    _, g = _grad(fc.sigmoid_focal_loss, xs, ts, alpha=None, gamma=0.0, backend=backend)
    _, g_ref = _grad(F.binary_cross_entropy_with_logits, xs, ts)
    torch.testing.assert_close(g, g_ref, rtol=1e-13, atol=1e-16)

    xd = torch.randn(N, 3, 2, 2, generator=gen, dtype=torch.float64).to(device)
    td = torch.randint(0, 3, (N, 2, 2), generator=gen).to(device)
    _, g = _grad(fc.dice_focal_loss, xd, td, gamma=0.0, backend=backend)
    _, g_ref = _grad(reference.dice_focal_loss, xd, td, gamma=0.0)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-16)


# ---------------------------------------------------------------------------------------------
# infinite and extreme logits: no NaN for gamma in [0, 5], on every backend (the reference too)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
@pytest.mark.parametrize("form", ["index", "probabilities"])
def test_softmax_infinite_logit_gives_no_nan(backend, device, gamma, form):
    """Infinite logits, class-index or class-probability targets (the one-hot of the same classes): where the
    target's probability is 1 the loss is 0 without smoothing and inf with it (log 0 has weight eps / C), a zero
    probability where log p = -inf adds 0 (not NaN), and the gradient is cross-entropy's, p - q, for every
    gamma (the focal factor's derivative vanishes there)."""
    for dtype in [torch.float32, torch.float64]:
        for C in [2, 3, 70]:  # 70: wider than the CPU lane kernel
            x = torch.zeros(2, C, dtype=dtype)
            x[0, 0] = INF
            x[1, C - 1] = INF
            t = torch.tensor([0, C - 1])
            target = t if form == "index" else F.one_hot(t, C).to(dtype)
            for eps in [0.0, 0.1]:
                loss, g = _grad(fc.softmax_focal_loss, x.to(device), target.to(device), gamma, label_smoothing=eps,
                                reduction="none", backend=backend)
                what = (backend, form, dtype, C, eps)
                assert not torch.isnan(loss).any() and torch.isfinite(g).all(), (what, loss, g)
                if eps == 0:
                    assert torch.equal(loss.cpu(), torch.zeros(2, dtype=dtype)), what
                else:
                    assert torch.isinf(loss).all(), what
                q = F.one_hot(t, C).to(torch.float64) * (1 - eps) + eps / C
                expected = F.one_hot(t, C).to(torch.float64) - q
                torch.testing.assert_close(g.cpu().double(), expected, rtol=1e-6, atol=1e-7, msg=str(what))
            if form == "index":  # Dice + focal: the same softmax
                xd = x.reshape(1, 2, C).transpose(1, 2).contiguous()  # (B=1, C, S=2)
                loss, g = _grad(fc.dice_focal_loss, xd.to(device), t.reshape(1, 2).to(device), gamma=gamma,
                                backend=backend)
                assert torch.isfinite(loss) and torch.isfinite(g).all(), (backend, dtype, C, loss, g)


@pytest.mark.parametrize("backend,device", backend_params())
def test_softmax_tied_infinite_logits_share_the_mass(backend, device):
    """[inf, inf, 0] is the limit of [a, a, 0]: p = [1/2, 1/2, 0]; [-inf, -inf] is uniform."""
    x = torch.tensor([[INF, INF, 0.0], [-INF, -INF, -INF], [INF, 0.0, INF]], dtype=torch.float64)
    t = torch.tensor([0, 1, 2])
    for gamma in [0.0, 2.0]:
        loss, g = _grad(fc.softmax_focal_loss, x.to(device), t.to(device), gamma, reduction="none", backend=backend)
        limit = torch.tensor([[40.0, 40.0, 0.0], [0.0, 0.0, 0.0], [40.0, 0.0, 40.0]], dtype=torch.float64)
        l_lim, g_lim = _grad(reference.softmax_focal_loss, limit, t, gamma, reduction="none")
        torch.testing.assert_close(loss.cpu(), l_lim, rtol=1e-12, atol=1e-12, msg=f"{backend} {gamma}")
        torch.testing.assert_close(g.cpu(), g_lim, rtol=1e-12, atol=1e-12, msg=f"{backend} {gamma}")


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
def test_sigmoid_infinite_logits_on_every_backend(backend, device, gamma):
    x = torch.tensor(focal_table.SIGMOID_SATURATED)
    infinite = torch.isinf(x).to(device)
    right = (x > 0).float()
    for dtype in [torch.float32, torch.float64]:
        loss, g = _grad(fc.sigmoid_focal_loss, x.to(device, dtype), right.to(device, dtype), 0.25, gamma, "none",
                        backend=backend)
        assert torch.isfinite(loss).all() and torch.isfinite(g).all(), (backend, dtype, loss, g)
        assert loss.abs().max() < 1e-6 and g.abs().max() < 1e-6
        # wrong side: inf at the infinite logits, a finite gradient alpha_t (p - t) there
        loss, g = _grad(fc.sigmoid_focal_loss, x.to(device, dtype), (1 - right).to(device, dtype), 0.25, gamma,
                        "none", backend=backend)
        assert torch.isinf(loss[infinite]).all() and torch.isfinite(loss[~infinite]).all(), (backend, dtype, loss)
        assert torch.isfinite(g).all(), (backend, dtype, g)
        torch.testing.assert_close(g[:2].cpu().double(), torch.tensor([0.75, -0.25], dtype=torch.float64))


@pytest.mark.parametrize("backend,device", backend_params())
def test_ignored_rows_with_extreme_logits_give_zero_gradient(backend, device):
    for dtype in [torch.float32, torch.float64]:
        big = torch.finfo(dtype).max
        x = torch.tensor([[big, -big, 0.0], [INF, 0.0, -INF], [0.0, 1.0, 2.0], [-INF, INF, 0.0]], dtype=dtype)
        t = torch.tensor([-100, -100, 1, -100])
        for gamma in [0.0, 0.5, 2.0]:
            for eps in [0.0, 0.1]:
                loss, g = _grad(fc.softmax_focal_loss, x.to(device), t.to(device), gamma, label_smoothing=eps,
                                backend=backend)
                what = (backend, dtype, gamma, eps)
                assert torch.isfinite(loss) and torch.isfinite(g).all(), (what, loss, g)
                assert torch.equal(g[[0, 1, 3]].cpu(), torch.zeros(3, 3, dtype=dtype)), (what, g)
                ref_loss, ref_g = _grad(reference.softmax_focal_loss, x[2:3].double(), t[2:3], gamma,
                                        label_smoothing=eps)
                torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(g[2:3].cpu().double(), ref_g, rtol=1e-5, atol=1e-6)
        # Dice + focal with the same pixels ignored
        xd = x.t().unsqueeze(0).contiguous()  # (1, C=3, S=4)
        loss, g = _grad(fc.dice_focal_loss, xd.to(device), t.unsqueeze(0).to(device), ignore_index=-100,
                        backend=backend)
        assert torch.isfinite(loss) and torch.isfinite(g).all(), (backend, dtype, loss, g)
        assert torch.equal(g[0, :, [0, 1, 3]].cpu(), torch.zeros(3, 3, dtype=dtype)), (backend, dtype, g)


# ---------------------------------------------------------------------------------------------
# argument checks


def test_num_positives_must_be_a_scalar_on_the_logits_device():
    x = torch.randn(4, 5)
    t = (torch.rand(4, 5) > 0.5).float()
    for bad in [torch.tensor([2.0, 3.0]), torch.ones(2, 2), torch.tensor(3.0, device="meta")]:
        with pytest.raises(ValueError, match="num_positives"):
            fc.sigmoid_focal_loss(x, t, num_positives=bad)
    for bad in ["3", None.__class__, float("nan"), 0.0, -2.0]:
        with pytest.raises((TypeError, ValueError), match="num_positives"):
            fc.sigmoid_focal_loss(x, t, num_positives=bad)
    ref = fc.sigmoid_focal_loss(x, t, reduction="sum") / 3
    for good in [3, 3.0, torch.tensor(3.0), torch.tensor([3.0]), torch.tensor(3)]:
        out = fc.sigmoid_focal_loss(x, t, num_positives=good)
        assert out.shape == () and torch.allclose(out, ref), good


def test_class_weight_counts_and_power_are_checked():
    for bad in [[1.0, float("nan"), 2.0], [1.0, -1.0], [float("inf"), 1.0]]:
        for fn in [fc.class_balanced_weights, fc.inverse_frequency_weights]:
            with pytest.raises(ValueError, match="counts"):
                fn(torch.tensor(bad))
    for power in [float("inf"), float("nan"), -1.0]:
        with pytest.raises(ValueError, match="power"):
            fc.inverse_frequency_weights(torch.tensor([1.0, 4.0]), power=power)
    with pytest.raises(TypeError, match="power"):
        fc.inverse_frequency_weights(torch.tensor([1.0, 4.0]), power="0.5")
    assert torch.allclose(fc.inverse_frequency_weights(torch.tensor([1.0, 4.0]), power=1.0),
                          torch.tensor([1.6, 0.4]))


@pytest.mark.parametrize("backend,device", backend_params())
def test_dice_focal_empty_batch_follows_torch(backend, device):
    expected = F.cross_entropy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))  # torch: "mean" over nothing
    assert math.isnan(expected.item())
    for batch_dice in [True, False]:
        for lambda_focal in [0.5, 0.0]:
            x = torch.zeros(0, 3, 4, 4, device=device, requires_grad=True)
            t = torch.zeros(0, 4, 4, dtype=torch.long, device=device)
            loss = fc.dice_focal_loss(x, t, lambda_focal=lambda_focal, batch_dice=batch_dice, backend=backend)
            assert loss.shape == () and loss.dtype == x.dtype and math.isnan(loss.item()), (batch_dice, loss)
            (g,) = torch.autograd.grad(loss, x)
            assert g.shape == x.shape


def test_gamma_and_tta_input_errors_name_the_argument():
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match="gamma"):
        fc.sigmoid_focal_loss(x, (x > 0).float(), gamma="2")
    with pytest.raises(TypeError, match="gamma"):
        fc.softmax_focal_loss(x, torch.tensor([0, 1, 2, 0]), gamma="2")
    with pytest.raises(TypeError, match="gamma"):
        fc.dice_focal_loss(torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), gamma="2")
    with pytest.raises(ValueError, match="gamma"):
        fc.softmax_focal_loss(x, torch.tensor([0, 1, 2, 0]), gamma=float("nan"))
    for bad in [torch.zeros(5), torch.tensor(1.0)]:
        with pytest.raises(ValueError, match="x must have at least 2 dims"):
            fc.tta_transform(bad, "hflip")
        with pytest.raises(ValueError, match="y must have at least 2 dims"):
            fc.tta_inverse(bad, "hflip")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fc.tta_transform([[1, 2], [3, 4]], "hflip")
    assert torch.equal(fc.tta_transform(torch.arange(4).view(2, 2), "hflip"), torch.tensor([[1, 0], [3, 2]]))
