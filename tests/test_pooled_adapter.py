"""The fused pooled-adapter op (fastcascade::pooled_adapter): every backend against the reference,
float64 gradcheck, opcheck, torch.compile, determinism, bad input."""

import pytest
import torch
from adapter_cases import (
    ACTIVATIONS,
    ADAPTER_BACKENDS,
    INTERPRETED_AOT,
    adapter_weights,
    adapter_x,
    check_runs_on_the_tensors_device,
    flat_ref,
    fwd_bwd,
)
from conftest import assert_within_model, reference_errors, seeded

import fastcascade as fc
from fastcascade import _ops, reference
from fastcascade.selftest.cases import for_tests
from fastcascade.selftest.cases import pooled_adapter as table


@pytest.mark.parametrize("backend,device", ADAPTER_BACKENDS)
@pytest.mark.parametrize("dtype", table.DTYPES)
@pytest.mark.parametrize("shape,r", [(row.shape, row["r"]) for row in for_tests(table.SHAPES)], ids=str)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_pooled_op_matches_reference(backend, device, dtype, shape, r, fmt):
    gen = seeded(shape, r)
    C = shape[1]
    for act in ACTIVATIONS:
        for with_scale in [False, True]:
            w = adapter_weights(C, r, gen=gen)
            s = [torch.tensor(0.7, dtype=torch.float64)] if with_scale else []
            x = adapter_x(shape, fmt, gen=gen)

            def ref(x, *p):
                return reference.pooled_adapter(x, *p[:4], act, p[4] if with_scale else None)

            code = _ops.ADAPTER_ACTIVATION_CODES[act]

            def fused(x, *p):
                return _ops.op("pooled_adapter", backend)(x, *p[:4], p[4] if with_scale else None, code,
                                                                  0.0, 0)[0]

            # float64 truth on the inputs the backends receive (x rounded to dtype, fp32 parameters)
            inputs64 = [x.to(dtype).double()] + [p.float().double() for p in w + s]
            y64, *g64 = flat_ref(ref, *inputs64)
            y_err, *g_err = reference_errors(lambda *a: flat_ref(ref, *a), inputs64, dtype, generator=gen)
            # fp32 parameters with a low-precision x, as under autocast
            y, g = fwd_bwd(fused, x.to(device, dtype), [p.float().to(device) for p in w + s])
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
            x = adapter_x((2, 5, 3, 2), fmt, gen=gen).requires_grad_(True)
            w = [p.requires_grad_(True) for p in adapter_weights(5, 3, gen=gen)]
            s = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
            op = _ops.op("pooled_adapter", backend)
            code = _ops.ADAPTER_ACTIVATION_CODES[act]
            # the interpreter is ~1000x slower than the C++ kernels: Triton gets gradcheck's fast mode
            fast = backend == "triton"
            assert torch.autograd.gradcheck(lambda *a: op(*a, code, 0.0, 0)[0], (x, *w, s), fast_mode=fast)
            assert torch.autograd.gradcheck(lambda *a: op(*a, None, code, 0.3, 5)[0], (x, *w), fast_mode=fast)


def _opcheck_samples(device):
    gen = torch.Generator().manual_seed(2)
    for fmt in [torch.contiguous_format, torch.channels_last]:
        x = adapter_x((3, 6, 2, 2), fmt, torch.float32, gen).to(device).requires_grad_(True)
        w = [p.float().to(device).requires_grad_(True) for p in adapter_weights(6, 4, gen=gen)]
        yield (x, *w, torch.tensor(0.5, device=device, requires_grad=True), 1, 0.0, 0)
        yield (x, *w, None, 2, 0.25, 9)


@pytest.mark.parametrize("backend,device", ADAPTER_BACKENDS)
def test_pooled_op_opcheck(backend, device):
    op = _ops.op("pooled_adapter", backend)
    for args in _opcheck_samples(device):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("backend,device", [
    pytest.param(*p.values, marks=list(p.marks) + ([INTERPRETED_AOT] if p.values[0] == "triton" else []), id=p.id)
    for p in ADAPTER_BACKENDS])
def test_pooled_op_aot_and_compile(backend, device):
    op = _ops.op("pooled_adapter", backend)
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
    x = adapter_x((33, 40, 3, 3), torch.channels_last, torch.float32, gen).to(device)
    w = [p.float().to(device) for p in adapter_weights(40, 8, gen=gen)]
    runs = []
    threads = torch.get_num_threads()
    for n in [1, max(2, threads)]:
        torch.set_num_threads(n)
        try:
            runs.append(fwd_bwd(lambda x, *p: _ops.op("pooled_adapter", backend)(x, *p, None, 1, 0.2, 3)[0],
                                 x, w))
        finally:
            torch.set_num_threads(threads)
    (y0, g0), (y1, g1) = runs
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_pooled_op_checks_for_direct_callers():
    x = torch.randn(2, 6, 3, 3)
    w = [p.float() for p in adapter_weights(6, 4)]
    op = torch.ops.fastcascade.pooled_adapter
    with pytest.raises(RuntimeError, match=r"down_w must be \(r, C\)"):
        op(x, w[0][:, :5], *w[1:], None, 0, 0.0, 0)
    with pytest.raises(RuntimeError, match=r"up_w must be \(C, r\)"):
        op(x, w[0], w[1], w[2][:5], w[3], None, 0, 0.0, 0)
    with pytest.raises(RuntimeError, match="activation must be"):
        op(x, *w, None, 3, 0.0, 0)
    with pytest.raises(RuntimeError, match="contiguous or channels_last"):
        op(x.transpose(2, 3), *w, None, 0, 0.0, 0)
    with pytest.raises(RuntimeError, match=r"x must be \(B, C, H, W\)"):
        op(x[0], *w, None, 0, 0.0, 0)


def test_module_uses_the_fused_op_for_pooled():
    m = fc.ResidualAdapter(8, 4, "pooled", init_std=0.3)
    x = torch.randn(2, 8, 3, 3)
    assert m._backend_for(x) == "cpu"
    y = m(x)
    m.backend = "torch"
    torch.testing.assert_close(y, m(x), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_triton_pooled_adapter_runs_on_the_tensors_device():
    """Triton launches on the current device: an adapter on cuda:1 while cuda:0 is current must still
    run on cuda:1 (the op guards the launch with the tensors' device)."""
    check_runs_on_the_tensors_device("pooled")
