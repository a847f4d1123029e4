"""The fused pooled-adapter op (fastcascade::pooled_adapter): every backend against the reference,
float64 gradcheck, opcheck, torch.compile, determinism, bad input."""

import os

import pytest
import torch
from conftest import assert_within_model, fused_backend_params, reference_errors, seeded

import fastcascade as fc
from fastcascade import _ops, reference

ADAPTER_BACKENDS = fused_backend_params()
ACTIVATIONS = ["relu", "gelu", "silu"]
INTERPRETED_AOT = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                     reason="AOT tracing of Triton kernels needs a GPU (not the interpreter)")


def _weights(C, r, std=0.3, gen=None, dtype=torch.float64):
    def rnd(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype)
    return [rnd(r, C), rnd(r), rnd(C, r), rnd(C)]


def _x(shape, fmt, dtype=torch.float64, gen=None):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(memory_format=fmt)


def _fwd_bwd(fn, x, params):
    x = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in params]
    y = fn(x, *params)
    # upstream gradient exactly representable in every dtype under test (bf16 values in [0.5, 1.5))
    g = (torch.rand(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5)
    g = g.to(torch.bfloat16).to(y.dtype)
    (y * g.to(y.device)).sum().backward()
    return y.detach(), [x.grad] + [p.grad for p in params]


def _flat_ref(ref, x, *params):
    y, grads = _fwd_bwd(ref, x, params)
    return [y] + grads


@pytest.mark.parametrize("backend,device", ADAPTER_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,r", [((3, 12, 5, 7), 5), ((1, 3, 1, 1), 1), ((7, 64, 4, 4), 64), ((2, 130, 2, 3), 16)],
                         ids=str)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_pooled_op_matches_reference(backend, device, dtype, shape, r, fmt):
    gen = seeded(shape, r)
    C = shape[1]
    for act in ACTIVATIONS:
        for with_scale in [False, True]:
            w = _weights(C, r, gen=gen)
            s = [torch.tensor(0.7, dtype=torch.float64)] if with_scale else []
            x = _x(shape, fmt, gen=gen)

            def ref(x, *p):
                return reference.pooled_adapter(x, *p[:4], act, p[4] if with_scale else None)

            code = _ops.ADAPTER_ACTIVATION_CODES[act]

            def fused(x, *p):
                return _ops.adapter_op("pooled_adapter", backend)(x, *p[:4], p[4] if with_scale else None, code)[0]

            # float64 truth on the inputs the backends receive (x rounded to dtype, fp32 parameters)
            inputs64 = [x.to(dtype).double()] + [p.float().double() for p in w + s]
            y64, *g64 = _flat_ref(ref, *inputs64)
            y_err, *g_err = reference_errors(lambda *a: _flat_ref(ref, *a), inputs64, dtype, generator=gen)
            # fp32 parameters with a low-precision x, as under autocast
            y, g = _fwd_bwd(fused, x.to(device, dtype), [p.float().to(device) for p in w + s])
            assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
            what = f"{backend} {dtype} {shape} r={r} {fmt} {act} scale={with_scale}"
            assert_within_model(y, y64, y_err, "y " + what)
            for i, (a, b, c) in enumerate(zip(g, g64, g_err)):
                assert a.shape == b.shape
                assert_within_model(a, b, c, f"grad {i} " + what)


@pytest.mark.parametrize("backend,device", [p for p in ADAPTER_BACKENDS if p.values[1] == "cpu"])
def test_pooled_op_gradcheck_float64(backend, device):
    gen = torch.Generator().manual_seed(0)
    for act in ACTIVATIONS:
        for fmt in [torch.contiguous_format, torch.channels_last]:
            x = _x((2, 5, 3, 2), fmt, gen=gen).requires_grad_(True)
            w = [p.requires_grad_(True) for p in _weights(5, 3, gen=gen)]
            s = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
            op = _ops.adapter_op("pooled_adapter", backend)
            code = _ops.ADAPTER_ACTIVATION_CODES[act]
            assert torch.autograd.gradcheck(lambda *a: op(*a, code)[0], (x, *w, s))
            assert torch.autograd.gradcheck(lambda *a: op(*a, None, code)[0], (x, *w))


def _opcheck_samples(device):
    gen = torch.Generator().manual_seed(2)
    for fmt in [torch.contiguous_format, torch.channels_last]:
        x = _x((3, 6, 2, 2), fmt, torch.float32, gen).to(device).requires_grad_(True)
        w = [p.float().to(device).requires_grad_(True) for p in _weights(6, 4, gen=gen)]
        yield (x, *w, torch.tensor(0.5, device=device, requires_grad=True), 1)
        yield (x, *w, None, 2)


@pytest.mark.parametrize("backend,device", ADAPTER_BACKENDS)
def test_pooled_op_opcheck(backend, device):
    op = _ops.adapter_op("pooled_adapter", backend)
    for args in _opcheck_samples(device):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("backend,device", [
    pytest.param(*p.values, marks=list(p.marks) + ([INTERPRETED_AOT] if p.values[0] == "triton" else []), id=p.id)
    for p in ADAPTER_BACKENDS])
def test_pooled_op_aot_and_compile(backend, device):
    op = _ops.adapter_op("pooled_adapter", backend)
    for args in _opcheck_samples(device):
        torch.library.opcheck(op, args, test_utils=("test_aot_dispatch_dynamic",))
    torch._dynamo.reset()
    m = fc.ResidualAdapter(6, 4, "pooled", "gelu", init_std=0.3, learn_scale=True, backend=backend).to(device)
    x = torch.randn(3, 6, 2, 2, device=device)
    compiled = torch.compile(m, fullgraph=True)
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ye, yc = m(xe), compiled(xc)
    ye.square().sum().backward()
    yc.square().sum().backward()
    torch.testing.assert_close(yc, ye)
    torch.testing.assert_close(xc.grad, xe.grad)


@pytest.mark.parametrize("backend,device", ADAPTER_BACKENDS)
def test_pooled_op_is_deterministic(backend, device):
    gen = torch.Generator().manual_seed(4)
    x = _x((33, 40, 3, 3), torch.channels_last, torch.float32, gen).to(device)
    w = [p.float().to(device) for p in _weights(40, 8, gen=gen)]
    runs = []
    threads = torch.get_num_threads()
    for n in [1, max(2, threads)]:
        torch.set_num_threads(n)
        try:
            runs.append(_fwd_bwd(lambda x, *p: _ops.adapter_op("pooled_adapter", backend)(x, *p, None, 1)[0], x, w))
        finally:
            torch.set_num_threads(threads)
    (y0, g0), (y1, g1) = runs
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_pooled_op_checks_for_direct_callers():
    x = torch.randn(2, 6, 3, 3)
    w = [p.float() for p in _weights(6, 4)]
    op = torch.ops.fastcascade.pooled_adapter
    with pytest.raises(RuntimeError, match=r"down_w must be \(r, C\)"):
        op(x, w[0][:, :5], *w[1:], None, 0)
    with pytest.raises(RuntimeError, match=r"up_w must be \(C, r\)"):
        op(x, w[0], w[1], w[2][:5], w[3], None, 0)
    with pytest.raises(RuntimeError, match="activation must be"):
        op(x, *w, None, 3)
    with pytest.raises(RuntimeError, match="contiguous or channels_last"):
        op(x.transpose(2, 3), *w, None, 0)
    with pytest.raises(RuntimeError, match=r"x must be \(B, C, H, W\)"):
        op(x[0], *w, None, 0)


def test_module_uses_the_fused_op_for_pooled():
    m = fc.ResidualAdapter(8, 4, "pooled", init_std=0.3)
    x = torch.randn(2, 8, 3, 3)
    assert m._backend_for(x, 0.0) == "cpu"
    y = m(x)
    m.backend = "torch"
    torch.testing.assert_close(y, m(x), rtol=1e-5, atol=1e-6)
