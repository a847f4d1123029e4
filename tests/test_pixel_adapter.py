"""The fused pixel / token adapter op (fastcascade::pixel_adapter): every backend against the reference,
float64 gradcheck, opcheck, torch.compile, determinism, dropout, bad input; the Triton kernels' wide-r
chunks and int64 offsets."""

import pytest
import torch
from adapter_cases import (
    ADAPTER_BACKENDS,
    INTERPRETED_AOT,
    adapter_weights,
    check_runs_on_the_tensors_device,
    flat_ref,
    fwd_bwd,
)
from conftest import assert_within_model, reference_errors, seeded

import fastcascade as fc
from fastcascade import _ops, reference
from fastcascade.selftest.cases import for_tests
from fastcascade.selftest.cases import pixel_adapter as table

# ---------------------------------------------------------------------------------------------
# pixel (token) adapter op

# (shape, memory format or None for tokens (T, C), r)
PIXEL_CASES = [(row.shape, table.memory_format(row), row["r"]) for row in for_tests(table.SHAPES)]


def _pixel_x(shape, fmt, dtype=torch.float64, gen=None):
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return x if fmt is None else x.contiguous(memory_format=fmt)


def _pixel_fused(backend, act, with_scale, p, seed):
    op = _ops.op("pixel_adapter", backend)
    code = _ops.ADAPTER_ACTIVATION_CODES[act]
    return lambda x, *w: op(x, *w[:4], w[4] if with_scale else None, code, p, seed)


def _pixel_ref(act, with_scale, p, seed, cdim):
    return lambda x, *w: reference.pixel_adapter(x, *w[:4], act, w[4] if with_scale else None, cdim, p, seed)


@pytest.mark.parametrize("backend,device", ADAPTER_BACKENDS)
@pytest.mark.parametrize("dtype", table.DTYPES)
@pytest.mark.parametrize("shape,fmt,r", PIXEL_CASES, ids=str)
def test_pixel_op_matches_reference(backend, device, dtype, shape, fmt, r):
    gen = seeded(shape, r, str(fmt))
    C = shape[1] if fmt is not None else shape[-1]
    cdim = 1 if fmt is not None else -1
    for act, with_scale, p in [("relu", False, 0.0), ("gelu", True, 0.0), ("silu", True, 0.3), ("gelu", False, 0.5)]:
        w = adapter_weights(C, r, gen=gen)
        s = [torch.tensor(0.7, dtype=torch.float64)] if with_scale else []
        x = _pixel_x(shape, fmt, gen=gen)
        seed = int(torch.randint(0, 2**62, (), generator=gen))
        ref = _pixel_ref(act, with_scale, p, seed, cdim)
        inputs64 = [x.to(dtype).double()] + [q.float().double() for q in w + s]
        y64, *g64 = flat_ref(ref, *inputs64)
        y_err, *g_err = reference_errors(lambda *a: flat_ref(ref, *a), inputs64, dtype, generator=gen)
        y, g = fwd_bwd(_pixel_fused(backend, act, with_scale, p, seed), x.to(device, dtype),
                        [q.float().to(device) for q in w + s])
        assert y.dtype == dtype and y.is_contiguous(memory_format=fmt or torch.contiguous_format)
        what = f"{backend} {dtype} {shape} {fmt} r={r} {act} scale={with_scale} dropout={p}"
        assert_within_model(y, y64, y_err, "y " + what)
        for i, (a, b, c) in enumerate(zip(g, g64, g_err)):
            assert a.shape == b.shape
            assert_within_model(a, b, c, f"grad {i} " + what)


@pytest.mark.parametrize("backend,device", [p for p in ADAPTER_BACKENDS if p.values[1] == "cpu"])
def test_pixel_op_gradcheck_float64(backend, device):
    gen = torch.Generator().manual_seed(0)
    for (shape, fmt), act, p in [(((2, 4, 2, 3), torch.contiguous_format), "gelu", 0.0),
                                 (((2, 4, 2, 3), torch.channels_last), "silu", 0.4),
                                 (((5, 4), None), "relu", 0.0)]:
        x = _pixel_x(shape, fmt, gen=gen).requires_grad_(True)
        w = [q.requires_grad_(True) for q in adapter_weights(4, 3, gen=gen)]
        s = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
        op = _ops.op("pixel_adapter", backend)
        code = _ops.ADAPTER_ACTIVATION_CODES[act]
        fast = backend == "triton"  # the interpreter is ~1000x slower: gradcheck's fast mode
        assert torch.autograd.gradcheck(lambda *a: op(*a, code, p, 11), (x, *w, s), fast_mode=fast)
        assert torch.autograd.gradcheck(lambda *a: op(*a, None, code, p, 11), (x, *w), fast_mode=fast)


def _pixel_opcheck_samples(device):
    gen = torch.Generator().manual_seed(2)
    for shape, fmt in [((3, 6, 2, 2), torch.contiguous_format), ((3, 6, 2, 2), torch.channels_last), ((9, 6), None)]:
        x = _pixel_x(shape, fmt, torch.float32, gen).to(device).requires_grad_(True)
        w = [q.float().to(device).requires_grad_(True) for q in adapter_weights(6, 4, gen=gen)]
        yield (x, *w, torch.tensor(0.5, device=device, requires_grad=True), 1, 0.0, 0)
        yield (x, *w, None, 2, 0.25, 123)


@pytest.mark.parametrize("backend,device", ADAPTER_BACKENDS)
def test_pixel_op_opcheck(backend, device):
    op = _ops.op("pixel_adapter", backend)
    for args in _pixel_opcheck_samples(device):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("backend,device", [
    pytest.param(*p.values, marks=list(p.marks) + ([INTERPRETED_AOT] if p.values[0] == "triton" else []), id=p.id)
    for p in ADAPTER_BACKENDS])
def test_pixel_op_aot_and_compile(backend, device):
    op = _ops.op("pixel_adapter", backend)
    for args in _pixel_opcheck_samples(device):
        torch.library.opcheck(op, args, test_utils=("test_aot_dispatch_dynamic",))
    for shape in [(3, 6, 2, 2), (2, 5, 6)]:
        torch._dynamo.reset()
        m = fc.ResidualAdapter(6, 4, "pixel", "gelu", init_std=0.3, learn_scale=True, backend=backend).to(device)
        x = torch.randn(shape, device=device)
        compiled = torch.compile(m, fullgraph=True)
        xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ye, yc = m(xe), compiled(xc)
        ye.square().sum().backward()
        yc.square().sum().backward()
        torch.testing.assert_close(yc, ye)
        torch.testing.assert_close(xc.grad, xe.grad)


@pytest.mark.parametrize("backend,device", ADAPTER_BACKENDS)
def test_pixel_op_is_deterministic(backend, device):
    gen = torch.Generator().manual_seed(4)
    x = _pixel_x((3, 40, 9, 11), torch.contiguous_format, torch.float32, gen).to(device)
    w = [q.float().to(device) for q in adapter_weights(40, 8, gen=gen)] + [torch.tensor(0.9, device=device)]
    runs = []
    threads = torch.get_num_threads()
    for n in [1, max(2, threads)]:
        torch.set_num_threads(n)
        try:
            runs.append(fwd_bwd(_pixel_fused(backend, "silu", True, 0.2, 99), x, w))
        finally:
            torch.set_num_threads(threads)
    (y0, g0), (y1, g1) = runs
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(g0, g1))


@pytest.mark.parametrize("backend,device", ADAPTER_BACKENDS)
def test_pixel_dropout_mask_comes_from_the_seed(backend, device):
    """Dropout: the mask is a function of (seed, position, j): same seed, same output; the layout
    does not matter (positions are numbered in (B, H, W) order); the kept fraction is 1 - p."""
    C, r, p = 16, 64, 0.3
    w = [q.float().to(device) for q in adapter_weights(C, r, std=1.0)]
    w[1] = torch.full((r,), 5.0, device=device)  # relu(h) > 0 everywhere: a zero in a marks a dropped unit
    x = torch.randn(4, C, 8, 8, device=device)
    op = _ops.op("pixel_adapter", backend)
    y1 = op(x, *w, None, 0, p, 7)
    assert torch.equal(y1, op(x, *w, None, 0, p, 7))
    assert not torch.equal(y1, op(x, *w, None, 0, p, 8))
    y_cl = op(x.contiguous(memory_format=torch.channels_last), *w, None, 0, p, 7)
    torch.testing.assert_close(y_cl, y1, rtol=1e-5, atol=1e-5)
    keep = reference.adapter_dropout_keep(7, torch.arange(4 * 8 * 8 * r), p)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01


def test_pixel_module_dropout_is_reproducible_and_off_in_eval():
    m = fc.ResidualAdapter(8, 16, "pixel", dropout=0.5, init_std=0.3)
    x = torch.randn(2, 8, 4, 4)
    assert m._backend_for(x) == "cpu"
    torch.manual_seed(3)
    y1 = m(x)
    torch.manual_seed(3)
    y2 = m(x)
    y3 = m(x)
    assert torch.equal(y1, y2) and not torch.equal(y2, y3)
    m.eval()
    m_ref = fc.ResidualAdapter(8, 16, "pixel", init_std=0.3, backend="torch")
    m_ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x), m_ref(x), rtol=1e-5, atol=1e-6)


def test_pixel_op_checks_for_direct_callers():
    x = torch.randn(2, 6, 3, 3)
    w = [q.float() for q in adapter_weights(6, 4)]
    op = torch.ops.fastcascade.pixel_adapter
    with pytest.raises(RuntimeError, match=r"dropout must be in \[0, 1\)"):
        op(x, *w, None, 0, 1.0, 0)
    with pytest.raises(RuntimeError, match=r"down_w must be \(r, C\)"):
        op(x, w[0][:, :5], *w[1:], None, 0, 0.0, 0)
    with pytest.raises(RuntimeError, match=r"must be \(B, C, H, W\)"):
        op(x[0], *w, None, 0, 0.0, 0)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        op(x[:, :, 0].transpose(0, 1).reshape(6, 6).t(), *w, None, 0, 0.0, 0)
    bwd = torch.ops.fastcascade._pixel_adapter_backward
    with pytest.raises(RuntimeError, match="grad_y must be laid out as x"):
        bwd(x.contiguous(memory_format=torch.channels_last), x, *w, None, 0, 0.0, 0)
    with pytest.raises(RuntimeError, match="grad_y must have x's shape"):
        bwd(x[:1], x, *w, None, 0, 0.0, 0)


# ---------------------------------------------------------------------------------------------
# Triton pixel adapter: wide r in column chunks, int64 channel offsets, launches on the tensors' device

TRITON_INTERP = [p for p in ADAPTER_BACKENDS if p.values[0] == "triton" and p.values[1] == "cpu"]


def test_pixel_triton_config_splits_wide_r_and_widens_big_samples():
    """The host picks chunked r past the register tile and int64 channel offsets once C times the
    channel stride passes 2^31 (the layouts from meta tensors: no memory)."""
    if not _ops.HAS_TRITON:
        pytest.skip("needs triton")
    from fastcascade.kernels import pixel_adapter as pa

    def cfg(shape, r, dtype=torch.bfloat16, cl=False):
        x = torch.empty(shape, dtype=dtype, device="meta")
        x = x.contiguous(memory_format=torch.channels_last) if cl else x
        T, C, HW, sb, sc, sp = pa._layout(x)
        return pa._config(x.dtype, C, r, sc)

    f32 = torch.float32
    assert not cfg((4, 64, 7, 7), pa._MAX_BLOCK_R, f32).SPLIT_R and cfg((4, 64, 7, 7), pa._MAX_BLOCK_R + 1, f32).SPLIT_R
    assert not cfg((4, 64, 7, 7), pa._MAX_BLOCK_R_HALF).SPLIT_R and cfg((9, 64), pa._MAX_BLOCK_R_HALF + 1).SPLIT_R
    assert cfg((4, 64, 7, 7), 1000, f32).BLOCK_R == pa._MAX_BLOCK_R and cfg((4, 64, 7, 7), 1).BLOCK_R == 16
    big = (1, 1 << 15, 256, 257)  # 2^31 + 2^23 elements in one NCHW sample
    assert cfg(big, 16).BIG_INDEX and not cfg((1, 1 << 15, 256, 255), 16).BIG_INDEX
    assert not cfg(big, 16, cl=True).BIG_INDEX  # channels_last: channel stride 1, positions are int64
    assert not cfg((1 << 26, 64), 16).BIG_INDEX  # tokens likewise


if _ops.HAS_TRITON:
    import triton
    import triton.language as tl
    from fastcascade.kernels.pixel_adapter import _cols

    @triton.jit
    def _channel_offsets_kernel(out_ptr, c0, C, stride_c, BLOCK_C: tl.constexpr):
        cc, cmask = _cols(c0, C, True, BLOCK_C)
        tl.store(out_ptr + tl.arange(0, BLOCK_C), cc * stride_c, mask=cmask)


@pytest.mark.parametrize("backend,device", TRITON_INTERP)
def test_pixel_triton_channel_offsets_are_int64_when_asked(backend, device):
    """The BIG_INDEX branch of the channel index: c * stride_c past 2^31 stays exact (int32 wraps, in
    the interpreter as on the GPU)."""
    C, stride = 4096, (1 << 20) + 7
    out = torch.zeros(64, dtype=torch.int64)
    _channel_offsets_kernel[(1,)](out, C - 64, C, stride, BLOCK_C=64)
    assert torch.equal(out, torch.arange(C - 64, C, dtype=torch.int64) * stride)


@pytest.mark.parametrize("backend,device", TRITON_INTERP)
@pytest.mark.parametrize("shape,fmt", [(row.shape, table.memory_format(row)) for row in table.WIDE_R_SHAPES],
                         ids=str)
def test_pixel_triton_wide_r_in_chunks_matches_reference(backend, device, shape, fmt, monkeypatch):
    """r = 40 over column chunks of 16 (the chunked path of r > _MAX_BLOCK_R, at a size the interpreter
    runs): forward, all gradients, dropout and scale as the reference."""
    from fastcascade.kernels import pixel_adapter as pa

    monkeypatch.setattr(pa, "_MAX_BLOCK_R", 16)
    r = 40
    C = shape[1] if fmt is not None else shape[-1]
    assert pa._config(torch.float32, C, r, 1).SPLIT_R
    gen = seeded("wide-r", shape)
    cdim = 1 if fmt is not None else -1
    for act, with_scale, p in [("gelu", True, 0.0), ("silu", False, 0.3)]:
        w = adapter_weights(C, r, gen=gen)
        s = [torch.tensor(0.7, dtype=torch.float64)] if with_scale else []
        x = _pixel_x(shape, fmt, gen=gen)
        ref = _pixel_ref(act, with_scale, p, 5, cdim)
        inputs64 = [x.float().double()] + [q.float().double() for q in w + s]
        y64, *g64 = flat_ref(ref, *inputs64)
        y_err, *g_err = reference_errors(lambda *a: flat_ref(ref, *a), inputs64, torch.float32, generator=gen)
        y, g = fwd_bwd(_pixel_fused(backend, act, with_scale, p, 5), x.float(), [q.float() for q in w + s])
        what = f"{shape} r={r} {act} scale={with_scale} dropout={p}"
        assert_within_model(y, y64, y_err, "y " + what)
        for i, (a, b, c) in enumerate(zip(g, g64, g_err)):
            assert_within_model(a, b, c, f"grad {i} " + what)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_triton_pixel_adapter_runs_on_the_tensors_device():
    """Triton launches on the current device: an adapter on cuda:1 while cuda:0 is current must still
    run on cuda:1 (the op guards the launch with the tensors' device)."""
    check_runs_on_the_tensors_device("pixel")
