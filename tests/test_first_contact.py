"""What a user meets first: the MONAI mapping of the Dice + focal loss where ignore_index and a single
remaining class change it, and the rule for negative class weights (focal: F.cross_entropy's; Dice +
focal: refused, as MONAI does)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import backend_params

import fastcascade as fc


def _case(C, gen, ignore_index=None, shape=(3, 9, 10)):
    x = torch.randn((shape[0], C) + shape[1:], generator=gen, dtype=torch.float32) * 2
    t = torch.randint(0, C, shape, generator=gen)
    if ignore_index is not None:
        t[torch.rand(shape, generator=gen) < 0.3] = ignore_index
    return x, t


def _monai_losses():
    pytest.importorskip("monai", reason="monai is not installed (pip install monai)")
    from monai.losses import DiceLoss, FocalLoss
    return DiceLoss, FocalLoss


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("ignore_index", [7, 2])  # outside [0, C) and a real class
def test_focal_term_with_ignore_index_equals_monai(backend, device, ignore_index):
    """With ignore_index MONAI's FocalLoss divides by the valid pixels: the factor C becomes 1."""
    _, MonaiFocal = _monai_losses()
    gen = torch.Generator().manual_seed(5)
    C = 4
    x, t = _case(C, gen, ignore_index)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monai = MonaiFocal(to_onehot_y=True, use_softmax=True, gamma=1.5, ignore_index=ignore_index)(x, t[:, None])
        monai_plain = MonaiFocal(to_onehot_y=True, use_softmax=True, gamma=1.5)(x, t.clamp(0, C - 1)[:, None])
    ours = fc.dice_focal_loss(x.to(device), t.to(device), gamma=1.5, lambda_dice=0.0, lambda_focal=1.0,
                              ignore_index=ignore_index, backend=backend).cpu()
    torch.testing.assert_close(ours, monai, rtol=1e-5, atol=1e-6)
    ours_plain = fc.dice_focal_loss(x.to(device), t.clamp(0, C - 1).to(device), gamma=1.5, lambda_dice=0.0,
                                    lambda_focal=1.0, backend=backend).cpu()
    torch.testing.assert_close(ours_plain, C * monai_plain, rtol=1e-5, atol=1e-6)  # no ignore_index: C x MONAI


@pytest.mark.parametrize("backend,device", backend_params())
def test_one_remaining_class_dice_is_unweighted_as_in_monai(backend, device):
    """C = 2 with include_background=False: MONAI's DiceLoss skips the weight; here w1 d1 / w1 = d1."""
    MonaiDice, MonaiFocal = _monai_losses()
    gen = torch.Generator().manual_seed(6)
    x, t = _case(2, gen)
    w = torch.tensor([0.7, 3.0])
    kw = dict(include_background=False, to_onehot_y=True, softmax=True, smooth_nr=1.0, smooth_dr=1.0, batch=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monai_weighted = MonaiDice(weight=w[1:], **kw)(x, t[:, None])
        monai_plain = MonaiDice(**kw)(x, t[:, None])
        with pytest.raises(ValueError, match="single-channel"):  # MONAI's focal term refuses the weight
            MonaiFocal(include_background=False, to_onehot_y=True, use_softmax=True, weight=w[1:])(x, t[:, None])
    torch.testing.assert_close(monai_weighted, monai_plain)
    ours = fc.dice_focal_loss(x.to(device), t.to(device), w.to(device), lambda_dice=1.0, lambda_focal=0.0,
                              include_background=False, backend=backend).cpu()
    torch.testing.assert_close(ours, monai_plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", backend_params())
def test_softmax_focal_accepts_negative_weights_like_cross_entropy(backend, device):
    gen = torch.Generator().manual_seed(7)
    x, t = _case(4, gen, ignore_index=-100)
    w = torch.tensor([1.0, -0.5, 2.0, 0.25])
    for reduction in ["mean", "sum", "none"]:
        xo = x.clone().to(device).requires_grad_(True)
        xr = x.clone().requires_grad_(True)
        ours = fc.softmax_focal_loss(xo, t.to(device), gamma=0.0, weight=w.to(device), reduction=reduction,
                                     backend=backend)
        ref = F.cross_entropy(xr, t, weight=w, reduction=reduction)
        torch.testing.assert_close(ours.detach().cpu(), ref.detach(), rtol=1e-5, atol=1e-6)
        (ours * 1.375).sum().backward()
        (ref * 1.375).sum().backward()
        torch.testing.assert_close(xo.grad.cpu(), xr.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_dice_focal_refuses_negative_or_non_finite_weights(backend, device, bad):
    gen = torch.Generator().manual_seed(8)
    x, t = _case(3, gen)
    w = torch.tensor([1.0, bad, 1.0])
    with pytest.raises(ValueError, match="weight must be finite and >= 0"):
        fc.dice_focal_loss(x.to(device), t.to(device), w.to(device), backend=backend)
    with pytest.raises(ValueError, match="weight must be finite and >= 0"):
        fc.DiceFocalLoss(weight=w, backend=backend)
    # a zero weight is a valid choice (the class is left out of both terms)
    loss = fc.dice_focal_loss(x.to(device), t.to(device), torch.tensor([1.0, 0.0, 1.0]).to(device), backend=backend)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("backend,device", backend_params())
def test_dice_focal_bad_weight_gives_nan_where_values_are_not_read_back(backend, device, monkeypatch):
    """On CUDA (or while compiling) weights are not read back to the host: the loss is NaN instead."""
    gen = torch.Generator().manual_seed(9)
    x, t = _case(3, gen)
    monkeypatch.setattr(fc.losses.dice_focal, "value_checks_on", lambda _t: False)
    loss = fc.dice_focal_loss(x.to(device), t.to(device), torch.tensor([1.0, -1.0, 1.0]).to(device),
                              backend=backend)
    assert torch.isnan(loss)
    good = fc.dice_focal_loss(x.to(device), t.to(device), torch.tensor([1.0, 2.0, 1.0]).to(device), backend=backend)
    assert torch.isfinite(good)


def test_monai_refuses_negative_class_weights():
    """The peer behaviour the decision follows (if MONAI changes, revisit the docstring)."""
    MonaiDice, MonaiFocal = _monai_losses()
    gen = torch.Generator().manual_seed(10)
    x, t = _case(3, gen)
    w = torch.tensor([1.0, -0.5, 1.0])
    with pytest.raises(ValueError):
        MonaiDice(to_onehot_y=True, softmax=True, weight=w)(x, t[:, None])
    with pytest.raises(ValueError):
        MonaiFocal(to_onehot_y=True, use_softmax=True, weight=w)(x, t[:, None])


@pytest.mark.parametrize("hw,expected", [((1, 1), "torch"), ((4, 4), "torch"), ((6, 6), "cpu"), ((14, 14), "cpu")])
def test_auto_pooled_adapter_on_cpu_takes_the_faster_backend(hw, expected, monkeypatch):
    """On the CPU the fused pooled kernel loses to the reference's GEMMs when few pixels share the
    products (1x1 maps: ~2.8x slower); "auto" then runs the reference. Explicit backends are kept."""
    monkeypatch.delenv("FASTCASCADE_BACKEND", raising=False)
    x = torch.randn((4, 32) + hw, generator=torch.Generator().manual_seed(12))
    m = fc.ResidualAdapter(32, 64, "pooled", init_std=0.02)
    assert m._backend_for(x) == expected
    assert fc.ResidualAdapter(32, 64, "pooled", backend="cpu")._backend_for(x) == "cpu"
    monkeypatch.setenv("FASTCASCADE_BACKEND", "cpu")
    assert m._backend_for(x) == "cpu"
    monkeypatch.delenv("FASTCASCADE_BACKEND")
    ref = fc.ResidualAdapter(32, 64, "pooled", init_std=0.02, backend="torch")
    ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x), ref(x))
    pixel = fc.ResidualAdapter(32, 64, "pixel")
    assert pixel._backend_for(x) == "cpu"
