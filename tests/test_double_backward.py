"""Second derivatives through the fused ops (backward with create_graph=True: gradient penalties,
Hessian-vector products, meta-learning): float64 gradgradcheck per op and backend, a gradient penalty
against the reference, and the first-order fast path left as it was."""

import pytest
import torch
from conftest import fused_backend_params

import fastcascade as fc
from fastcascade import _ops, reference

BACKENDS = fused_backend_params()
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
ACTS = ["relu", "gelu", "silu"]
F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _ggc(fn, inputs, backend):
    """gradgradcheck with random upstream gradients (also differentiated). Triton runs under its
    interpreter here, about 1000x slower: there gradgradcheck's fast mode (the derivatives along random
    directions, not every element) keeps a call to seconds."""
    assert torch.autograd.gradgradcheck(fn, inputs, atol=1e-6, rtol=1e-4, fast_mode=backend == "triton")


# ---------------------------------------------------------------------------------------------
# losses

SIGMOID_CASES = [  # (alpha, gamma, label_smoothing, soft targets)
    (0.25, 2.0, 0.0, False), (-1.0, 0.0, 0.0, False), (0.6, 1.5, 0.1, True), (-1.0, 3.0, 0.2, False),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("reduction", list(REDUCTIONS))
@pytest.mark.parametrize("case", SIGMOID_CASES, ids=str)
def test_sigmoid_focal_gradgradcheck(backend, device, reduction, case):
    alpha, gamma, eps, soft = case
    g = _gen(1)
    x = (torch.randn(3, 4, generator=g, dtype=F64) * 2).to(device).requires_grad_(True)
    t = torch.rand(3, 4, generator=g, dtype=F64) if soft else (torch.rand(3, 4, generator=g) > 0.5).to(F64)
    t = t.to(device)
    op = _ops.op("sigmoid_focal", backend)
    _ggc(lambda a: op(a, t, alpha, gamma, eps, REDUCTIONS[reduction], True)[0], (x,), backend)


SOFTMAX_CASES = [  # (gamma, weighted, label_smoothing, ignore some rows, spatial)
    (2.0, False, 0.0, False, False), (0.0, True, 0.0, True, False), (1.5, True, 0.1, True, True),
    (3.0, False, 0.2, False, True),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("reduction", list(REDUCTIONS))
@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=str)
def test_softmax_focal_gradgradcheck(backend, device, reduction, case):
    gamma, weighted, eps, ignore, spatial = case
    g = _gen(2)
    shape = (2, 3, 3) if spatial else (5, 3)
    x = (torch.randn(shape, generator=g, dtype=F64) * 2).to(device).requires_grad_(True)
    t = torch.randint(0, 3, (shape[0],) + shape[2:], generator=g)
    if ignore:
        t.view(-1)[1] = -100
    t = t.to(device)
    w = torch.tensor([0.5, 2.0, 1.25], dtype=F64, device=device) if weighted else None
    op = _ops.op("softmax_focal", backend)
    _ggc(lambda a: op(a, t, w, gamma, eps, -100, REDUCTIONS[reduction], True)[0], (x,), backend)


SOFTMAX_PROB_CASES = [  # (gamma, weighted, label_smoothing, spatial); targets: class probabilities
    (2.0, False, 0.0, False), (0.0, True, 0.1, False), (1.5, True, 0.0, True), (3.0, False, 0.2, True),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("reduction", list(REDUCTIONS))
@pytest.mark.parametrize("case", SOFTMAX_PROB_CASES, ids=str)
def test_softmax_focal_probabilities_gradgradcheck(backend, device, reduction, case):
    gamma, weighted, eps, spatial = case
    g = _gen(6)
    shape = (2, 3, 3) if spatial else (5, 3)
    x = (torch.randn(shape, generator=g, dtype=F64) * 2).to(device).requires_grad_(True)
    r = torch.softmax(torch.randn(shape, generator=g, dtype=F64), 1)
    r[0] = torch.nn.functional.one_hot(torch.tensor(1), 3).to(F64).view(3, *([1] * (len(shape) - 2)))  # zeros
    r = r.to(device)
    w = torch.tensor([0.5, 2.0, 1.25], dtype=F64, device=device) if weighted else None
    op = _ops.op("softmax_focal", backend)
    _ggc(lambda a: op(a, r, w, gamma, eps, -100, REDUCTIONS[reduction], True)[0], (x,), backend)


DICE_CASES = [  # (gamma, weighted, lambda_dice, lambda_focal, ignore_index, include_background, batch_dice)
    (2.0, False, 0.5, 0.5, None, True, True), (0.0, True, 1.0, 0.0, 255, False, False),
    (1.5, True, 0.3, 0.7, 255, True, False), (3.0, False, 0.0, 1.0, None, False, True),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", DICE_CASES, ids=str)
def test_dice_focal_gradgradcheck(backend, device, case):
    gamma, weighted, ld, lf, ignore_index, bg, batch = case
    g = _gen(3)
    x = (torch.randn(2, 3, 4, generator=g, dtype=F64) * 2).to(device).requires_grad_(True)
    t = torch.randint(0, 3, (2, 4), generator=g)
    if ignore_index is not None:
        t[0, 1] = ignore_index
    t = t.to(device)
    w = torch.tensor([0.5, 2.0, 1.25], dtype=F64, device=device) if weighted else None
    ii = _ops.NO_IGNORE_INDEX if ignore_index is None else ignore_index
    op = _ops.op("dice_focal", backend)
    _ggc(lambda a: op(a, t, w, gamma, 1.0, ld, lf, ii, bg, batch)[0], (x,), backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_loss_gradient_penalty_matches_reference(backend, device):
    """d/dx |d loss / dx|^2 through the public API equals the reference's (float64)."""
    g = _gen(4)
    xs = torch.randn(4, 3, generator=g, dtype=F64).to(device)
    ts = (torch.rand(4, 3, generator=g) > 0.5).to(F64).to(device)
    xc = torch.randn(2, 3, 2, 2, generator=g, dtype=F64).to(device)
    tc = torch.randint(0, 3, (2, 2, 2), generator=g).to(device)
    w = torch.tensor([0.5, 2.0, 1.25], dtype=F64, device=device)
    tr = torch.softmax(torch.randn(2, 3, 2, 2, generator=g, dtype=F64), 1).to(device)
    losses = {
        "sigmoid": (lambda x, b: fc.sigmoid_focal_loss(x, ts, 0.25, 2.0, "mean", 0.1, backend=b), xs),
        "softmax": (lambda x, b: fc.softmax_focal_loss(x, tc, 2.0, w, label_smoothing=0.1, backend=b), xc),
        "softmax probabilities": (lambda x, b: fc.softmax_focal_loss(x, tr, 2.0, w, label_smoothing=0.1, backend=b),
                                  xc),
        "dice_focal": (lambda x, b: fc.dice_focal_loss(x, tc, w, gamma=2.0, backend=b), xc),
    }
    for name, (f, x0) in losses.items():
        out = {}
        for b in (backend, "torch"):
            x = x0.clone().requires_grad_(True)
            (gx,) = torch.autograd.grad(f(x, b), x, create_graph=True)
            assert gx.requires_grad, f"{name}: the first derivative is not differentiable"
            (ggx,) = torch.autograd.grad(gx.pow(2).sum(), x)
            out[b] = (gx.detach(), ggx)
        torch.testing.assert_close(out[backend][0], out["torch"][0], rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(out[backend][1], out["torch"][1], rtol=1e-8, atol=1e-10, msg=name)
        assert out[backend][1].abs().max() > 0, name


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_loss_side_outputs_are_not_differentiable(backend, device):
    """The saved d loss / d logits and normaliser outputs cannot be backpropagated into (a zero gradient
    would be a wrong number)."""
    x = torch.randn(3, 4, dtype=F64, device=device, requires_grad=True)
    t = torch.zeros(3, 4, dtype=F64, device=device)
    _, grad_logits, grad_scale = _ops.op("sigmoid_focal", backend)(x, t, 0.25, 2.0, 0.0, 1, True)
    assert not grad_logits.requires_grad and not grad_scale.requires_grad
    tc = torch.zeros(3, dtype=torch.int64, device=device)
    _, grad_logits, grad_scale = _ops.op("softmax_focal", backend)(x, tc, None, 2.0, 0.0, -100, 1, True)
    assert not grad_logits.requires_grad and not grad_scale.requires_grad


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_loss_ops_refuse_gradients_for_constants(backend, device):
    """Class weights and targets are constants of the fused losses: an op-level caller asking for their
    gradient gets an error, not a missing gradient."""
    x = torch.randn(3, 4, dtype=F64, device=device, requires_grad=True)
    w = torch.ones(4, dtype=F64, device=device, requires_grad=True)
    tc = torch.zeros(3, dtype=torch.int64, device=device)
    loss = _ops.op("softmax_focal", backend)(x, tc, w, 2.0, 0.0, -100, 1, True)[0]
    with pytest.raises(RuntimeError, match="weight"):
        loss.backward()
    tr = torch.full((3, 4), 0.25, dtype=F64, device=device, requires_grad=True)
    loss = _ops.op("softmax_focal", backend)(x, tr, None, 2.0, 0.0, -100, 1, True)[0]
    with pytest.raises(RuntimeError, match="target"):
        loss.backward()
    ts = torch.zeros(3, 4, dtype=F64, device=device, requires_grad=True)
    loss = _ops.op("sigmoid_focal", backend)(x, ts, 0.25, 2.0, 0.0, 1, True)[0]
    with pytest.raises(RuntimeError, match="targets"):
        loss.backward()
    xd = torch.randn(2, 4, 3, dtype=F64, device=device, requires_grad=True)
    loss = _ops.op("dice_focal", backend)(xd, tc[:2, None].expand(2, 3).contiguous(), w, 2.0, 1.0, 0.5, 0.5,
                                          _ops.NO_IGNORE_INDEX, True, True)[0]
    with pytest.raises(RuntimeError, match="weight"):
        loss.backward()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_first_order_fast_path_unchanged(backend, device, dtype):
    """Without create_graph the backward is the forward's saved d loss / d logits times the upstream
    gradient, bitwise, and builds no graph."""
    g = _gen(5)
    x = torch.randn(6, 5, generator=g, dtype=dtype).to(device).requires_grad_(True)
    ts = (torch.rand(6, 5, generator=g) > 0.5).to(dtype).to(device)
    tc = torch.randint(0, 5, (6,), generator=g).to(device)
    tr = torch.softmax(torch.randn(6, 5, generator=g, dtype=dtype), 1).to(device)
    calls = {"sigmoid_focal": lambda code: _ops.op("sigmoid_focal", backend)(x, ts, 0.25, 2.0, 0.1, code, True),
             "softmax_focal": lambda code: _ops.op("softmax_focal", backend)(x, tc, None, 2.0, 0.1, -100, code, True),
             "softmax_focal probabilities": lambda code: _ops.op("softmax_focal", backend)(x, tr, None, 2.0, 0.1, -100,
                                                                                           code, True)}
    for red, code in REDUCTIONS.items():
        for name, call in calls.items():
            loss, grad_logits, grad_scale = call(code)
            up = torch.rand(loss.shape, generator=g, dtype=dtype).to(device) + 0.5
            (gx,) = torch.autograd.grad(loss, x, up)
            assert not gx.requires_grad
            if code == 0:
                want = grad_logits * (up if name == "sigmoid_focal" else up.unsqueeze(1))
            else:
                want = grad_logits * (up * grad_scale).to(dtype)
            assert torch.equal(gx, want), (name, red)
    xd = torch.randn(2, 3, 4, generator=g, dtype=dtype).to(device).requires_grad_(True)
    td = torch.randint(0, 3, (2, 4), generator=g).to(device)
    args = (None, 2.0, 1.0, 0.5, 0.5, _ops.NO_IGNORE_INDEX, True, True)
    loss, inter, card, stats = _ops.op("dice_focal", backend)(xd, td, *args)
    (gx,) = torch.autograd.grad(loss, xd, torch.tensor(1.5, dtype=loss.dtype, device=device))
    want = _ops.op("_dice_focal_backward", backend)(torch.tensor(1.5, dtype=loss.dtype, device=device), xd.detach(),
                                                     td, None, inter, card, stats, *args[1:])
    assert not gx.requires_grad and torch.equal(gx, want)


# ---------------------------------------------------------------------------------------------
# adapters


def _adapter_inputs(kind, fmt, with_scale, seed=6):
    g = _gen(seed)
    C, r = 3, 2
    shape = (2, C, 2, 2) if kind == "pooled" or fmt != "tokens" else (5, C)
    x = torch.randn(shape, generator=g, dtype=F64)
    if fmt == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    w = [torch.randn(s, generator=g, dtype=F64) * 0.7 for s in ((r, C), (r,), (C, r), (C,))]
    s = [torch.tensor(1.3, dtype=F64)] if with_scale else []
    return [x] + w + s


ADAPTER_CASES = [  # (fmt, scale tensor, dropout, seed)
    ("nchw", True, 0.0, 0), ("nhwc", False, 0.3, 5), ("tokens", True, 0.3, 11),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", ["pooled", "pixel"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("case", ADAPTER_CASES, ids=str)
def test_adapter_gradgradcheck(backend, device, kind, act, case):
    fmt, with_scale, p, seed = case
    if kind == "pooled" and fmt == "tokens":
        fmt = "nchw"
    inputs = [a.to(device).requires_grad_(True) for a in _adapter_inputs(kind, fmt, with_scale)]
    op = _ops.op(f"{kind}_adapter", backend)
    code = _ops.ADAPTER_ACTIVATION_CODES[act]

    def fn(*a):
        out = op(*a, code, p, seed) if with_scale else op(*a, None, code, p, seed)
        return out[0] if kind == "pooled" else out

    _ggc(fn, inputs, backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", ["pooled", "pixel"])
def test_adapter_partial_requires_grad(backend, device, kind):
    """Only some inputs differentiable (frozen x, frozen down projection): still exact second derivatives."""
    inputs = [a.to(device) for a in _adapter_inputs(kind, "nchw", True, seed=7)]
    for a in (inputs[3], inputs[4], inputs[5]):
        a.requires_grad_(True)
    op = _ops.op(f"{kind}_adapter", backend)

    def fn(uw, ub, s):
        out = op(inputs[0], inputs[1], inputs[2], uw, ub, s, _ops.ADAPTER_ACTIVATION_CODES["gelu"], 0.0, 0)
        return out[0] if kind == "pooled" else out

    _ggc(fn, (inputs[3], inputs[4], inputs[5]), backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", ["pooled", "pixel"])
def test_adapter_gradient_penalty_matches_reference(backend, device, kind):
    """d/dtheta |d sum(y * v) / dx|^2 for every input theta equals the reference's (float64)."""
    base = [a.to(device) for a in _adapter_inputs(kind, "nchw", True, seed=9)]
    v = torch.randn(base[0].shape, generator=_gen(9), dtype=F64).to(device)
    fused = _ops.op(f"{kind}_adapter", backend)
    refs = {"pooled": reference.pooled_adapter, "pixel": lambda *a: reference.pixel_adapter(*a, channel_dim=1)}
    for act in ACTS:
        out = {}
        for b in (backend, "torch"):
            inputs = [a.clone().requires_grad_(True) for a in base]
            x, dw, db, uw, ub, s = inputs
            if b == "torch":
                y = refs[kind](x, dw, db, uw, ub, act, s)
            else:
                y = fused(x, dw, db, uw, ub, s, _ops.ADAPTER_ACTIVATION_CODES[act], 0.0, 0)
                y = y[0] if kind == "pooled" else y
            (gx,) = torch.autograd.grad((y * v).sum(), x, create_graph=True)
            out[b] = torch.autograd.grad(gx.pow(2).sum(), inputs, allow_unused=True)
        for i, (a, e) in enumerate(zip(out[backend], out["torch"])):
            if e is None:  # not reached in the reference's graph: the fused op must give zeros or None
                assert a is None or not a.any(), (act, i)
            else:
                torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-10, msg=f"{act} input {i}")
        assert any(e is not None and e.abs().max() > 0 for e in out["torch"])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kind", ["pooled", "pixel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adapter_first_order_fast_path_unchanged(backend, device, kind, dtype):
    """Without create_graph the gradients are the fused backward op's outputs, bitwise, with no graph."""
    inputs = [a.to(dtype).to(device).requires_grad_(True) for a in _adapter_inputs(kind, "nhwc", True, seed=10)]
    op = _ops.op(f"{kind}_adapter", backend)
    bw = _ops.op(f"_{kind}_adapter_backward", backend)
    code = _ops.ADAPTER_ACTIVATION_CODES["silu"]
    out = op(*inputs, code, 0.25, 3)
    y = out[0] if kind == "pooled" else out
    up = (torch.rand(y.shape, generator=_gen(12), dtype=dtype).to(device) + 0.5).contiguous(
        memory_format=torch.channels_last)
    grads = torch.autograd.grad(y, inputs, up)
    x, dw, db, uw, ub, s = [a.detach() for a in inputs]
    if kind == "pooled":
        want = bw(up, out[1], out[2], dw, uw, ub, s, code, 0.25, 3)
    else:
        want = bw(up, x, dw, db, uw, ub, s, code, 0.25, 3)
    for i, (a, e) in enumerate(zip(grads, want)):
        assert not a.requires_grad and torch.equal(a, e), i


# ---------------------------------------------------------------------------------------------
# routing


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gather_scatter_rows_gradgradcheck(backend, device):
    g = _gen(13)
    x = torch.randn(6, 2, 3, generator=g, dtype=F64).to(device).requires_grad_(True)
    idx = torch.tensor([4, 0, 2, 5], device=device)
    gather, scatter = _ops.op("gather_rows", backend), _ops.op("scatter_rows", backend)
    _ggc(lambda a: gather(a, idx), (x,), backend)
    src = torch.randn(4, 2, 3, generator=g, dtype=F64).to(device).requires_grad_(True)
    _ggc(lambda a: scatter(a, idx, 6), (src,), backend)
