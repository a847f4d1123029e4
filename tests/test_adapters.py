"""Residual adapters: module vs fastcascade.reference (and vs an independent conv/linear form), model
surgery on timm / torchvision backbones, frozen BatchNorm, adapter-only checkpoints, param groups."""

import copy
import io

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from conftest import assert_within_model, reference_errors
from torch import nn

from fastcascade import adapters as A
from fastcascade import reference

ACTS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}
BACKENDS = ["torch", "auto"]


def _adapter(C, r, kind, activation="relu", learn_scale=False, init_std=0.3, dtype=torch.float32, **kw):
    """An adapter with non-trivial weights (init_std large, random biases and scale)."""
    m = A.ResidualAdapter(C, r, kind, activation, init_std=init_std, learn_scale=learn_scale, **kw)
    with torch.no_grad():
        m.down_proj.bias.normal_()
        m.up_proj.bias.normal_(0, 0.3)
        if learn_scale:
            m.scale.fill_(0.7)
    return m.to(dtype)


def _weights(m):
    return (m.down_proj.weight, m.down_proj.bias, m.up_proj.weight, m.up_proj.bias)


def _fwd_bwd(fn, x, params):
    """Output and gradients w.r.t. x and params, with an upstream gradient that is not all ones."""
    x = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in params]
    y = fn(x, *params)
    g = (torch.rand(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5) * 2
    (y * g.to(y.dtype)).sum().backward()
    return y.detach(), [x.grad] + [p.grad for p in params]


def _x(shape, layout, dtype=torch.float32):
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "noncontig":
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x


def _assert_same_format(y, x):
    """channels_last in, channels_last out; contiguous (or any other layout) in, contiguous out."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        assert y.is_contiguous(memory_format=torch.channels_last), y.stride()
    else:
        assert y.is_contiguous(), y.stride()


def _params(m):
    return [p for p in [*_weights(m), m.scale] if p is not None]


def _ref_fn(kind, activation, cdim):
    def fn(x, dw, db, uw, ub, scale=None):
        if kind == "pooled":
            return reference.pooled_adapter(x, dw, db, uw, ub, activation, scale)
        return reference.pixel_adapter(x, dw, db, uw, ub, activation, scale, channel_dim=cdim)
    return fn


def _module_fn(m):
    """m as a function of (x, *_params(m))."""
    names = ["down_proj.weight", "down_proj.bias", "up_proj.weight", "up_proj.bias"]
    names += ["scale"] if m.scale is not None else []

    def fn(x, *params):
        return torch.func.functional_call(m, dict(zip(names, params)), (x,))
    return fn


# ---------------------------------------------------------------------------------------------
# the reference against an independent formulation (nn.Linear on the pooled map, 1x1 conv)


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
@pytest.mark.parametrize("shape", [(1, 7, 1, 1), (3, 5, 4, 7), (2, 16, 3, 3)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontig"])
def test_reference_matches_conv_and_linear(activation, shape, layout):
    C = shape[1]
    m = _adapter(C, 3, "pooled", activation, learn_scale=True, dtype=torch.float64)
    x = _x(shape, layout, torch.float64)
    act = ACTS[activation]
    s = m.scale
    want = x + s * m.up_proj(act(m.down_proj(x.mean((2, 3)))))[:, :, None, None]
    got = reference.pooled_adapter(x, *_weights(m), activation, s)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # pixel, (B, C, H, W): two 1x1 convolutions
    h = act(F.conv2d(x, m.down_proj.weight[:, :, None, None], m.down_proj.bias))
    want = x + s * F.conv2d(h, m.up_proj.weight[:, :, None, None], m.up_proj.bias)
    got = reference.pixel_adapter(x, *_weights(m), activation, s, channel_dim=1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    _assert_same_format(got, x)
    # tokens: the same positions as (..., C)
    tok = x.permute(0, 2, 3, 1)
    got_t = reference.pixel_adapter(tok, *_weights(m), activation, s.item(), channel_dim=-1)
    torch.testing.assert_close(got_t, want.permute(0, 2, 3, 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["pooled", "pixel"])
def test_reference_keeps_layout_and_dtype(kind):
    m = _adapter(6, 4, kind)
    for dtype in [torch.float32, torch.bfloat16, torch.float16]:
        for layout in ["contiguous", "channels_last"]:
            x = _x((2, 6, 5, 3), layout, dtype)
            y = m.to(dtype)(x)
            assert y.dtype == dtype and y.shape == x.shape
            _assert_same_format(y, x)


# ---------------------------------------------------------------------------------------------
# the module against the reference: forward and backward, dtypes, layouts


CASES = [  # kind, shape, layout, channel dim
    ("pooled", (3, 12, 5, 7), "contiguous", 1),
    ("pooled", (2, 12, 4, 4), "channels_last", 1),
    ("pooled", (1, 12, 1, 1), "contiguous", 1),
    ("pixel", (3, 12, 5, 7), "contiguous", 1),
    ("pixel", (2, 12, 4, 3), "channels_last", 1),
    ("pixel", (4, 9, 12), "tokens", -1),
    ("pixel", (7, 12), "tokens", -1),
    ("pixel", (12,), "tokens", -1),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,shape,layout,cdim", CASES,
                         ids=lambda v: str(v) if isinstance(v, tuple) else None)
@pytest.mark.parametrize("activation,learn_scale", [("relu", False), ("gelu", True), ("silu", True)])
def test_module_matches_reference(backend, dtype, kind, shape, layout, cdim, activation, learn_scale):
    m = _adapter(12, 5, kind, activation, learn_scale, backend=backend)
    x = _x(shape, layout)
    params = _params(m)
    ref = _ref_fn(kind, activation, cdim)
    def flat_ref(x, *params):
        y, grads = _fwd_bwd(ref, x, params)
        return [y] + grads

    inputs64 = [x.double()] + [p.double() for p in params]
    y64, *g64 = flat_ref(*inputs64)
    y_err, *g_err = reference_errors(flat_ref, inputs64, dtype)
    mod = m.to(dtype)
    y, g = _fwd_bwd(_module_fn(mod), x.to(dtype), _params(mod))
    assert y.dtype == dtype and y.shape == x.shape
    _assert_same_format(y, x)
    what = f"{backend} {dtype} {kind} {shape} {layout} {activation}"
    assert_within_model(y, y64, y_err, "out " + what)
    for i, (a, b, c) in enumerate(zip(g, g64, g_err)):
        assert a.dtype == dtype and a.shape == b.shape
        assert_within_model(a, b, c, f"grad {i} " + what)


def test_module_mixed_precision_params():
    """fp32 parameters with a bf16 input (as under autocast): bf16 out, fp32 gradients for the params."""
    for kind in ["pooled", "pixel"]:
        m = _adapter(8, 4, kind, "gelu", learn_scale=True)
        x = _x((2, 8, 3, 3), "channels_last", torch.bfloat16).requires_grad_(True)
        y = m(x)
        assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
        y.float().square().sum().backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())
        want = _ref_fn(kind, "gelu", 1)(x.detach(), *[p.to(torch.bfloat16) for p in _params(m)])
        # the fused ops read fp32 parameters and accumulate in fp32: within bf16 rounding of the reference
        exact = _ref_fn(kind, "gelu", 1)(x.detach().double(), *[p.double() for p in _params(m)])
        assert (y.double() - exact).abs().max() <= (want.double() - exact).abs().max() + 1e-2


@pytest.mark.parametrize("kind,shape", [("pooled", (2, 5, 3, 4)), ("pixel", (2, 5, 3, 2)),
                                        ("pixel", (3, 4, 5))], ids=str)
@pytest.mark.parametrize("activation", ["gelu", "silu", "relu"])
def test_gradcheck_float64(kind, shape, activation):
    C = shape[1] if len(shape) == 4 else shape[-1]
    m = _adapter(C, 3, kind, activation, learn_scale=True, dtype=torch.float64)
    x = _x(shape, "contiguous", torch.float64).requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in _params(m)]
    assert torch.autograd.gradcheck(_module_fn(m), (x, *params))
    if len(shape) == 4:
        xcl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
        assert torch.autograd.gradcheck(_module_fn(m), (xcl, *params))


@pytest.mark.parametrize("kind", ["pooled", "pixel"])
def test_identity_at_init(kind):
    torch.manual_seed(0)
    for C, r in [(64, 64), (512, 64), (7, 1)]:
        m = A.ResidualAdapter(C, r, kind)
        x = _x((2, C, 6, 5), "contiguous")
        y = m(x)
        dev = ((y - x).abs().max() / x.abs().max()).item()
        assert dev < m.init_std, (C, r, dev)  # identity up to init_std
        assert dev > 0 or r == 1, (C, r)  # yet not exactly: it can learn (r = 1 may sit in relu's zero)
        assert m.down_proj.bias.abs().max() == 0 and m.up_proj.bias.abs().max() == 0
        assert abs(m.up_proj.weight.std().item() - 1e-3) < 3e-4


def test_dropout_train_only_and_reproducible():
    """Training-mode dropout runs in the fused ops with a mask drawn from a seed that torch's CPU
    generator supplies: torch.manual_seed reproduces it, and the reference with that seed agrees."""
    x = _x((4, 16, 3, 3), "contiguous")
    for kind in ["pooled", "pixel"]:
        m = _adapter(16, 8, kind, dropout=0.5)
        ref = reference.pooled_adapter if kind == "pooled" else (
            lambda *a, **k: reference.pixel_adapter(*a, channel_dim=1, **k))
        m.eval()  # no dropout: the fused op (fp32 math), close to the reference
        torch.testing.assert_close(m(x), ref(x, *_weights(m)), rtol=1e-5, atol=1e-6)
        m.train()
        torch.manual_seed(3)
        y1 = m(x)
        torch.manual_seed(3)
        seed = int(torch.randint(0, 2**62, ()))
        torch.manual_seed(3)
        assert torch.equal(y1, m(x))
        torch.testing.assert_close(y1, ref(x, *_weights(m), dropout=0.5, seed=seed), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(y1, ref(x, *_weights(m)), rtol=1e-5, atol=1e-6)
        m.backend = "torch"  # the reference's dropout is F.dropout's
        torch.manual_seed(3)
        y_torch = m(x)
        torch.manual_seed(3)
        assert torch.equal(y_torch, ref(x, *_weights(m), dropout=0.5))


def test_deterministic():
    for kind in ["pooled", "pixel"]:
        m = _adapter(32, 8, kind, "gelu", learn_scale=True)
        x = _x((3, 32, 9, 9), "channels_last")
        runs = [_fwd_bwd(_module_fn(m), x, _params(m)) for _ in range(2)]
        assert torch.equal(runs[0][0], runs[1][0])
        assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("kwargs,match", [
    ({"channels": 0}, "channels must be >= 1, got 0"),
    ({"channels": 2.5}, "channels must be an int"),
    ({"bottleneck": 0}, "bottleneck must be >= 1, got 0"),
    ({"bottleneck": True}, "bottleneck must be an int"),
    ({"kind": "conv"}, "kind must be one of .*'conv'"),
    ({"activation": "tanh"}, "activation must be one of .*'tanh'"),
    ({"dropout": 1.0}, "dropout must be in"),
    ({"init_std": 0.0}, "init_std must be > 0"),
    ({"backend": "fast"}, "backend must be one of"),
])
def test_bad_arguments(kwargs, match):
    args = {"channels": 8, "bottleneck": 4, **kwargs}
    error = TypeError if "must be an int" in match else ValueError
    with pytest.raises(error, match=match):
        A.ResidualAdapter(**args)


def test_bad_inputs():
    pooled, pixel = A.ResidualAdapter(64, 8, "pooled"), A.ResidualAdapter(64, 8, "pixel")
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 64, H, W\), got \(2, 32, 4, 4\)"):
        pooled(torch.randn(2, 32, 4, 4))
    with pytest.raises(ValueError, match=r"got \(2, 4, 4, 64\) \(channels in the last dim"):
        pooled(torch.randn(2, 4, 4, 64))
    with pytest.raises(ValueError, match=r"got \(2, 9, 64\) \(tokens\? use kind='pixel'\)"):
        pooled(torch.randn(2, 9, 64))
    with pytest.raises(ValueError, match=r"\(B, 64, H, W\) or tokens \(\.\.\., 64\), got \(2, 9, 63\)"):
        pixel(torch.randn(2, 9, 63))
    with pytest.raises(ValueError, match="floating-point"):
        pixel(torch.ones(2, 64, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        pixel([1.0] * 64)
    w = _weights(pixel)
    with pytest.raises(ValueError, match="channel_dim must be 1"):
        reference.pixel_adapter(torch.randn(2, 64), *w, channel_dim=0)
    with pytest.raises(ValueError, match="activation must be one of"):
        reference.pooled_adapter(torch.randn(2, 64, 2, 2), *w, activation="elu")
    with pytest.raises(ValueError, match=r"x must be \(B, C, H, W\)"):
        reference.pooled_adapter(torch.randn(2, 64), *w)
    pooled.backend = "cuda"
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        pooled(torch.randn(1, 64, 2, 2))


# ---------------------------------------------------------------------------------------------
# surgery on real backbones


def _backbone(name, seed=0):
    torch.manual_seed(seed)
    if name == "tv_resnet18":
        return torchvision.models.resnet18(weights=None)
    return timm.create_model(name, pretrained=False)


BACKBONES = {  # name: (default sites, their channels)
    "resnet18": (["layer1", "layer2", "layer3", "layer4"], [64, 128, 256, 512]),
    "tv_resnet18": (["layer1", "layer2", "layer3", "layer4"], [64, 128, 256, 512]),
    "efficientnet_b0": ([f"blocks.{i}" for i in range(7)], [16, 24, 40, 80, 112, 192, 320]),
    "convnext_tiny": ([f"stages.{i}" for i in range(4)], [96, 192, 384, 768]),
}


@pytest.mark.parametrize("name", list(BACKBONES))
@pytest.mark.parametrize("kind", ["pooled", "pixel"])
def test_surgery_on_backbones(name, kind):
    model = _backbone(name)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        before = model(x)
    model.train()
    modes = {m: m.training for m in model.modules()}
    sites, chans = BACKBONES[name]
    touched = A.add_adapters(model, bottleneck=16, kind=kind)
    assert touched == sites
    for n, c in zip(sites, chans):
        blk = model.get_submodule(n)
        assert isinstance(blk, A.AdaptedBlock) and blk.adapter.channels == c and blk.adapter.kind == kind
    assert all(m.training == mode for m, mode in modes.items())  # the dummy forward restored every flag
    model.eval()
    with torch.no_grad():
        after = model(x)
    rel = ((after - before).norm() / before.norm()).item()
    assert rel < 1e-2, rel
    assert any(k.endswith("adapter.down_proj.weight") for k in model.state_dict())


def test_adapted_model_loads_unadapted_state_dict():
    model = _backbone("resnet18")
    original = copy.deepcopy(model.state_dict())
    A.add_adapters(model, bottleneck=8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    res = model.load_state_dict(original, strict=False)
    assert res.unexpected_keys == [] and sorted(res.missing_keys) == sorted(
        k for k in model.state_dict() if ".adapter." in k)
    for k, v in original.items():
        if k.startswith("layer"):
            head, _, rest = k.partition(".")
            k = f"{head}.block.{rest}"
        assert torch.equal(model.state_dict()[k], v), k


def test_where_names_regex_and_errors():
    model = _backbone("resnet18")
    assert A.add_adapters(model, "layer[12]", bottleneck=4) == ["layer1", "layer2"]
    assert model.layer1.adapter.channels == 64 and model.layer2.adapter.channels == 128
    # nested choices: inner first, names as before the surgery
    touched = A.add_adapters(model, ["layer3", "layer3.1"], bottleneck=4, kind="pixel", channels={"layer3": 256})
    assert touched == ["layer3", "layer3.1"]
    assert isinstance(model.layer3.block[1], A.AdaptedBlock) and model.layer3.block[1].adapter.channels == 256
    with pytest.raises(ValueError, match=r"no module named 'layer_4'.*'layer4'.*named_modules"):
        A.add_adapters(model, ["layer_4"])
    with pytest.raises(ValueError, match=r"matches no module name.*named_modules"):
        A.add_adapters(model, "stage[0-9]")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        A.add_adapters(model, "layer[")
    with pytest.raises(ValueError, match="'layer1' already has an adapter"):
        A.add_adapters(model, ["layer1"])
    with pytest.raises(ValueError, match="'layer1.block' already has an adapter"):
        A.add_adapters(model, ["layer1.block"])
    with pytest.raises(ValueError, match="part of an adapter"):
        A.add_adapters(model, ["layer1.adapter.down_proj"])
    with pytest.raises(ValueError, match="already has an adapter"):
        A.add_adapters(model)  # the default sites again
    with pytest.raises(ValueError, match="bottleneck must be >= 1"):
        A.add_adapters(model, ["layer4"], bottleneck=0)
    with pytest.raises(ValueError, match="activation must be one of"):
        A.add_adapters(model, ["layer4"], activation="tanh")
    with pytest.raises(ValueError, match="no default adapter sites for Sequential"):
        A.add_adapters(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="kind='pooled' needs a \\(B, C, H, W\\) output.*'fc'"):
        A.add_adapters(model, ["fc"])
    assert not isinstance(model.layer4, A.AdaptedBlock) and not isinstance(model.fc, A.AdaptedBlock)


def test_token_model_pixel_adapters():
    """kind='pixel' after transformer-style blocks on (B, N, C) tokens; channels from the last dim."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 24), nn.GELU(), nn.Linear(24, 24), nn.LayerNorm(24))
    x = torch.randn(2, 5, 10)
    with pytest.raises(ValueError, match="dummy forward with input"):
        A.add_adapters(model, ["0", "2"], kind="pixel")  # the default (1, 3, 64, 64) input does not fit
    assert A.add_adapters(model, ["0", "2"], kind="pixel", example_input=x, bottleneck=4) == ["0", "2"]
    assert model[0].adapter.channels == 24 and model[2].adapter.channels == 24
    assert model(x).shape == (2, 5, 24)


# ---------------------------------------------------------------------------------------------
# freezing


def _sgd_steps(model, steps=3, num_classes=None, lr=0.5):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        x = torch.randn(2, 3, 64, 64, generator=gen) * 3 + 1  # far from the running statistics
        out = model(x)
        loss = F.cross_entropy(out, torch.randint(0, out.shape[1], (2,), generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.rpartition(".")[2] in ("running_mean", "running_var", "num_batches_tracked")}


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_frozen_bn_statistics_unchanged_by_training(name):
    model = _backbone(name)
    A.add_adapters(model, bottleneck=8)
    counts = A.freeze_backbone(model)
    assert 0 < counts.trainable < counts.frozen
    bn = _bn_state(model)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    assert not any(m.training for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    _sgd_steps(model)
    assert model.training
    after = _bn_state(model)
    assert bn.keys() == after.keys() and len(bn) > 10
    for k in bn:
        assert torch.equal(bn[k], after[k]), k
    for n, p in model.named_parameters():
        changed = not torch.equal(params[n], p)
        assert changed == p.requires_grad or p.grad is None or not p.grad.any(), n
        if not p.requires_grad:
            assert not changed, n
    head = "fc.weight" if name == "resnet18" else "classifier.weight"
    assert not torch.equal(params[head], model.get_parameter(head))
    assert not torch.equal(params["layer1.adapter.up_proj.weight" if name == "resnet18" else
                                  "blocks.0.adapter.up_proj.weight"],
                           model.get_parameter("layer1.adapter.up_proj.weight" if name == "resnet18" else
                                               "blocks.0.adapter.up_proj.weight"))


def test_freeze_matching_and_release():
    model = _backbone("resnet18")
    A.add_adapters(model, bottleneck=8)
    A.freeze_backbone(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".adapter." in n or n.startswith("fc.") for n in trainable) and "fc.weight" in trainable
    # the hold survives train()/eval(), deepcopy, a wrapping module and torch.save(model)
    wrapped = nn.Sequential(model)
    wrapped.train()
    assert not model.bn1.training and model.layer1.block[0].bn1.training is False and model.training
    for m in [copy.deepcopy(model), _pickle_round_trip(model)]:
        m.train()
        assert m.training and not m.bn1.training and m.bn1.train.module is m.bn1
    # unfreezing a BN's parameters lets it train again at the next train()
    for p in model.bn1.parameters():
        p.requires_grad_(True)
    model.train()
    assert model.bn1.training and not model.layer1.block[0].bn1.training
    model.eval()
    assert not model.bn1.training
    # calling again re-applies the rule: everything trainable, nothing held
    _unfreeze_all(model)
    model.train()
    assert all(p.requires_grad for p in model.parameters()) and model.layer4.block[1].bn2.training


def _unfreeze_all(model):
    """freeze_backbone with every top-level name trainable: all parameters trainable, no norm held."""
    A.freeze_backbone(model, trainable=[n for n, _ in model.named_children()])


def _pickle_round_trip(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_component_matching_on_convnext_and_efficientnet():
    conv = _backbone("convnext_tiny")
    A.freeze_backbone(conv)
    assert conv.get_parameter("head.fc.weight").requires_grad
    assert conv.get_parameter("head.norm.weight").requires_grad
    assert not conv.get_parameter("stages.0.blocks.0.mlp.fc1.weight").requires_grad  # "fc" is not "fc1"
    eff = _backbone("efficientnet_b0")
    A.freeze_backbone(eff)
    assert eff.classifier.weight.requires_grad
    assert not eff.conv_head.weight.requires_grad  # "head" is not "conv_head"


def test_trainable_parameters():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    c = A.trainable_parameters(model)
    assert (c.trainable, c.frozen, c.total) == (3 + 8, 12, 23) and abs(c.percent - 100 * 11 / 23) < 1e-12
    assert "11 trainable of 23 parameters (47.83%), 12 frozen" == str(c)


# ---------------------------------------------------------------------------------------------
# adapter-only checkpoints


def _stage2_model(name="resnet18", backbone_seed=0, adapter_seed=1, sites=None,
                  trainable=A.DEFAULT_TRAINABLE):
    model = _backbone(name, backbone_seed)
    torch.manual_seed(adapter_seed)
    A.add_adapters(model, sites, bottleneck=8, learn_scale=True)
    A.freeze_backbone(model, trainable)
    return model


def _save_load(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.fixture(scope="module")
def trained():
    """A Stage-2 style model: frozen resnet18 + adapters + head, trained a few steps; its checkpoint."""
    model = _stage2_model()
    _sgd_steps(model, steps=2, lr=0.1)
    model.eval()
    state = A.adapter_state_dict(model)
    return model, state


def test_checkpoint_round_trip_bitwise(trained):
    model, state = trained
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
    loaded = _save_load(state)
    keys = [k for k in loaded if k != A.META_KEY]
    assert "fc.weight" in keys and "layer4.adapter.scale" in keys
    assert all(".adapter." in k or k.startswith("fc.") for k in keys)
    assert loaded[A.META_KEY]["held_eval"] and "bn1.running_mean" in loaded[A.META_KEY]["backbone"]
    fresh = _stage2_model(adapter_seed=7)  # same backbone, other adapters: the load must overwrite them
    _unfreeze_all(fresh)  # nothing held: the load must restore it
    fresh.train()  # loading onto a model in train mode
    res = A.load_adapter_state_dict(fresh, loaded)
    assert res.missing_keys == [] and res.unexpected_keys == []
    with torch.no_grad():
        got_train = fresh(x)  # frozen BNs are held again: train mode gives the eval outputs
        got = fresh.eval()(x)
    assert torch.equal(got, want) and torch.equal(got_train, want)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(keys)


def test_checkpoint_is_a_snapshot(trained):
    model, state = trained
    model = copy.deepcopy(model)
    state = A.adapter_state_dict(model)
    before = {k: v.clone() for k, v in state.items() if k != A.META_KEY}
    _sgd_steps(model, steps=1)
    assert all(torch.equal(before[k], state[k]) for k in before)
    assert not torch.equal(state["fc.weight"], model.fc.weight)


def test_checkpoint_other_backbone_weights_raise(trained):
    _, state = trained
    other = _stage2_model(backbone_seed=123)
    with pytest.raises(ValueError, match=r"backbone weights differ.*fingerprint ([0-9a-f]{12}) \(checkpoint\) "
                                         r"vs ([0-9a-f]{12}) \(this model\)") as e:
        A.load_adapter_state_dict(other, _save_load(state))
    fp = state[A.META_KEY]["fingerprint"][:12]
    assert fp in str(e.value)
    # one changed bit of one frozen weight is enough
    same = _stage2_model()
    with torch.no_grad():
        w = same.layer3.block[0].conv2.weight
        w.view(-1)[5] = torch.nextafter(w.view(-1)[5], torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"1 of \d+ backbone tensors differ, e.g. "
                                         r"\['layer3.block.0.conv2.weight'\]"):
        A.load_adapter_state_dict(same, state)
    A.load_adapter_state_dict(same, state, check_backbone=False)  # explicitly allowed
    assert torch.equal(same.fc.weight, state["fc.weight"])


def test_checkpoint_other_architecture_raises(trained):
    _, state = trained
    with pytest.raises(ValueError, match=r"architecture differs.*fingerprint [0-9a-f]{12} \(checkpoint\) vs "
                                         r"[0-9a-f]{12}.*checkpoint tensors this model lacks"):
        A.load_adapter_state_dict(_stage2_model("efficientnet_b0"), state)
    bare = _backbone("resnet18")  # no adapters inserted
    with pytest.raises(ValueError, match=r"architecture differs.*layer1.adapter.down_proj.bias.*same "
                                         r"add_adapters"):
        A.load_adapter_state_dict(bare, state)
    fewer = _stage2_model(sites=["layer1", "layer2", "layer3"])
    with pytest.raises(ValueError, match=r"layer4.adapter"):
        A.load_adapter_state_dict(fewer, state)
    res = A.load_adapter_state_dict(fewer, state, strict=False)
    assert sorted(res.unexpected_keys) == sorted(k for k in state if k.startswith("layer4.adapter."))
    assert torch.equal(fewer.layer1.adapter.up_proj.weight, state["layer1.adapter.up_proj.weight"])


def test_checkpoint_drifted_bn_statistics_raise():
    """Training with frozen weights but BatchNorm in train mode moves the running statistics: the saved
    adapters then only fit the drifted backbone, and loading onto the original one must refuse."""
    model = _backbone("resnet18")
    A.add_adapters(model, bottleneck=8, learn_scale=True)
    for n, p in model.named_parameters():
        p.requires_grad_(".adapter." in n or n.startswith("fc."))  # frozen by hand: BN not held
    _sgd_steps(model, steps=1)
    state = A.adapter_state_dict(model)
    fresh = _stage2_model(adapter_seed=3)
    with pytest.raises(ValueError, match="Only normalisation running statistics differ"):
        A.load_adapter_state_dict(fresh, state)


def test_checkpoint_frozen_head_is_fingerprinted(trained):
    model = _stage2_model(trainable=("adapter",))
    state = _save_load(A.adapter_state_dict(model))
    assert not any(k.startswith("fc.") for k in state) and "fc.weight" in state[A.META_KEY]["backbone"]
    other = _stage2_model(trainable=("adapter",))
    with torch.no_grad():
        other.fc.weight.mul_(2)
    with pytest.raises(ValueError, match=r"e.g. \['fc.weight'\]"):
        A.load_adapter_state_dict(other, state)


def test_checkpoint_bad_state():
    model = _stage2_model()
    with pytest.raises(ValueError, match="not an adapter_state_dict"):
        A.load_adapter_state_dict(model, model.state_dict())
    state = A.adapter_state_dict(model)
    state[A.META_KEY] = dict(state[A.META_KEY], format=99)
    with pytest.raises(ValueError, match="unsupported adapter_state_dict format 99"):
        A.load_adapter_state_dict(model, state)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        A.adapter_state_dict(model)


def test_damaged_adapter_state_names_what_is_missing():
    import warnings

    model = _stage2_model()
    state = _save_load(A.adapter_state_dict(model))
    for entry in ("backbone", "fingerprint", "tensors", "checksum"):
        damaged = dict(state)
        damaged[A.META_KEY] = {k: v for k, v in state[A.META_KEY].items() if k != entry}
        with pytest.raises(ValueError, match=rf"adapter state is damaged: .* lacks \['{entry}'\]"):
            A.load_adapter_state_dict(model, damaged)
    damaged = dict(state, **{A.META_KEY: dict(state[A.META_KEY], backbone=[1, 2])})
    with pytest.raises(ValueError, match=r"wrong type: 'backbone' \(list\)"):
        A.load_adapter_state_dict(model, damaged)
    gone = "layer2.adapter.up_proj.weight"
    damaged = {k: v for k, v in state.items() if k != gone}
    with pytest.raises(ValueError, match=rf"lacks 1 of the \d+ tensors it was saved with: \['{gone}'\]"):
        A.load_adapter_state_dict(model, damaged)
    # in another order (a dict comprehension over sorted keys, the tensors moved): still intact
    A.load_adapter_state_dict(model, {k: state[k] for k in sorted(state, reverse=True)})
    # format 1 (no checksum, no tensor list): loads, with a warning
    old = dict(state, **{A.META_KEY: {k: v for k, v in state[A.META_KEY].items() if k not in ("tensors", "checksum")}})
    old[A.META_KEY]["format"] = 1
    with pytest.warns(UserWarning, match="format 1 has no checksum"):
        A.load_adapter_state_dict(model, old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        A.load_adapter_state_dict(model, state)  # the current format: no warning


# ---------------------------------------------------------------------------------------------
# optimizer groups


def test_param_groups():
    model = _backbone("resnet18")
    A.add_adapters(model, bottleneck=8)
    A.freeze_backbone(model)
    groups = A.param_groups(model)
    by = {g["name"]: g for g in groups}
    assert [g["name"] for g in groups] == ["adapter", "head", "backbone"]
    assert (by["adapter"]["lr"], by["head"]["lr"], by["backbone"]["lr"]) == (1e-4, 5e-4, 1e-6)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(".adapter." in names[id(p)] for p in by["adapter"]["params"])
    assert {names[id(p)] for p in by["head"]["params"]} == {"fc.weight", "fc.bias"}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))  # frozen ones included
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    head = model.fc.weight.detach().clone()
    _step(model, opt)
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)
    assert not torch.equal(head, model.fc.weight)
    # unfreeze: the backbone group now moves (at its own small lr), its BNs train again
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    assert model.bn1.training
    w = model.conv1.weight.detach().clone()
    _step(model, opt)
    assert 0 < (model.conv1.weight - w).abs().max() < 1e-5
    # other forms of lr / weight_decay
    g2 = A.param_groups(model, lr=0.1, weight_decay={"backbone": 0.0}, include_frozen=False)
    assert all(g["lr"] == 0.1 for g in g2) and [g.get("weight_decay") for g in g2] == [None, None, 0.0]
    g3 = A.param_groups(model, lr={"head": 1e-2})
    assert [g["lr"] for g in g3] == [1e-4, 1e-2, 1e-6]
    with pytest.raises(ValueError, match=r"unknown group names \['adapters'\]"):
        A.param_groups(model, lr={"adapters": 1e-3})
    with pytest.raises(ValueError, match=r"lr\['head'\] must be >= 0"):
        A.param_groups(model, lr={"head": -1.0})


def _step(model, opt):
    x = torch.randn(2, 3, 64, 64)
    loss = model(x).logsumexp(1).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


# ---------------------------------------------------------------------------------------------
# torch.compile


class _TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.layer2(self.layer1(x)).mean((2, 3)))


def test_compile_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _TinyNet()
    assert A.add_adapters(model, bottleneck=4, learn_scale=True, activation="gelu") == ["layer1", "layer2"]
    A.add_adapters(model, ["layer2.block.1"], kind="pixel", bottleneck=4, activation="silu")
    A.freeze_backbone(model)
    model.train()
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(model, fullgraph=True)
    yc = compiled(x)
    yc.square().sum().backward()
    gc = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ye = model(x)
    ye.square().sum().backward()
    torch.testing.assert_close(yc, ye)
    assert gc.keys() == {n for n, p in model.named_parameters() if p.grad is not None} and len(gc) == 16
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(gc[n], p.grad, msg=n)
