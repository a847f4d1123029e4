"""sm_90 compile gate for the Triton kernels, on a machine without a GPU; and their launch path.

Each case (the GATE table of each family's fastcascade/selftest/cases/<stem>.py) runs an op's own host
code (fastcascade.kernels._common.HOST_FUNCTIONS) on meta tensors with the launch path recording instead
of launching, so the kernels, grids, constexprs, num_warps and scalar arguments are exactly the ones
that call would launch, at any size (meta tensors take no memory). Each recorded launch is then
specialised as Triton's runtime would specialise it (its own binder: integer arguments equal to 1
become constants, 16-divisible ones get divisibility hints) and compiled for sm_90 with the bundled
ptxas. Asserted per case: it compiles, the grid is within CUDA's limits, shared memory is within the
H100/H200 per-block limit; at the benchmark shapes also that ptxas reports no register spills.

The interpreter (TRITON_INTERPRET=1, how the rest of the suite runs Triton here) defines kernels that
cannot be compiled, so the compilation runs in one subprocess without it, for all cases at once,
compiling each distinct specialisation once. Run as a script (``python tests/test_triton_compile.py``)
it prints each case's kernels with their shared memory, registers and spills.
"""

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fastcascade.selftest.cases import GateCase, Meta, gate_cases  # noqa: E402

SHARED_LIMIT = 232_448  # bytes of shared memory per block, H100 / H200 (sm_90), with the opt-in
GRID_LIMITS = (2**31 - 1, 65535, 65535)
COMPILE_BUDGET_S = 180  # per distinct compile; the slowest here takes ~25 s on a loaded 2-core machine


# the cases: every family's compile-gate table (fastcascade/selftest/cases/<stem>.py, GATE)
CASES = gate_cases()


# ----------------------------------------------------------------------------
# the subprocess: record launches, specialise, compile
# ----------------------------------------------------------------------------


@triton.jit
def _precise_softmax_probe(x_ptr, out_ptr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The softmax the focal tile kernels use, alone: its compiled PTX shows which exp and division
    it runs."""
    from_rows = tl.arange(0, BLOCK_R)[:, None] * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    x = tl.load(x_ptr + from_rows)
    cols = tl.arange(0, BLOCK_C)
    _, lp, p, om, inv = _focal_precise_softmax(x, cols, cols < BLOCK_C)
    tl.store(out_ptr + from_rows, lp + p + om + inv[:, None])


try:  # the helper the probe calls, as a global of this module (the probe's scope)
    from fastcascade.kernels._common import precise_softmax as _focal_precise_softmax
except ImportError:  # pragma: no cover - collected without the package installed
    _focal_precise_softmax = None


class _Fake:
    """What Triton's binder reads of a tensor argument: dtype and data_ptr (for 16-byte alignment)."""

    def __init__(self, dtype, ptr):
        self.dtype, self._ptr = dtype, ptr

    def data_ptr(self):
        return self._ptr


def _meta_tensor(spec: Meta):
    t = torch.empty(spec.shape, dtype=spec.dtype, device="meta")
    if spec.fmt == "cl":
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def _host_functions() -> dict:
    """Every Triton op's host function by op name (importing the kernels defines them; off a GPU and
    outside the interpreter, as in the gate's subprocess, that happens on first use only)."""
    from fastcascade import _ops
    from fastcascade.kernels import _common

    _ops.load_triton_ops()
    return _common.HOST_FUNCTIONS


def _record_launches(op: str, args: tuple):
    from fastcascade.kernels import _common

    host = _host_functions()
    launches = []

    def wrap(kernel):
        class _Grid:
            def __getitem__(self, grid):
                return lambda *a, **kw: launches.append((kernel, tuple(grid), a, kw))

        return _Grid()

    real = _common.wrap_triton
    _common.wrap_triton = wrap
    try:
        host[op](*[_meta_tensor(a) if isinstance(a, Meta) else a for a in args])
    finally:
        _common.wrap_triton = real
    return launches


def _specialise(backend, kernel, args, meta):
    """(signature, constexprs, attrs, options) of a launch, by Triton's own runtime logic."""
    from triton import knobs
    from triton.runtime import jit as tjit

    kwargs = dict(meta)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    if hasattr(knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = tjit.create_function_from_signature(kernel.signature, kernel.params, backend)
    fakes = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):  # 256-aligned allocations, shifted by the view's offset
            a = _Fake(a.dtype, (i + 1) * 4096 + a.storage_offset() * a.element_size())
        fakes.append(a)
    bound, spec, options = binder(*fakes, **kwargs)
    if hasattr(kernel, "_pack_args"):
        return kernel._pack_args(backend, kwargs, bound, spec, options)
    from triton._utils import find_paths_if, get_iterable_path  # the runtime's inline logic before 3.8

    options = backend.parse_options(kwargs)
    sigvals = [x[0] for x in spec]
    signature = {p.name: v for p, v in zip(kernel.params, sigvals)}
    constexprs = {path: get_iterable_path(list(bound.values()), path)
                  for path in find_paths_if(sigvals, lambda _, v: v == "constexpr")}
    attrvals = ["" if x[0] == "constexpr" else x[1] for x in spec]
    attrs = {k: backend.parse_attr(get_iterable_path(attrvals, k))
             for k in find_paths_if(attrvals, lambda _, x: isinstance(x, str))}
    return options, signature, constexprs, attrs


def _ptxas_stats(log: str) -> dict:
    def num(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else None

    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame")}


class _CompileTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise _CompileTimeout(f"did not compile within {COMPILE_BUDGET_S} s (a kernel too big for its registers "
                          "makes ptxas run for many minutes)")


def _compile(backend, target, kernel, signature, constexprs, attrs, options) -> dict:
    from triton.compiler import ASTSource

    log = io.StringIO()
    t0 = time.perf_counter()
    # subprocess.run kills ptxas when the alarm interrupts it
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(COMPILE_BUDGET_S)
    try:
        with contextlib.redirect_stdout(log):
            ck = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                options=options.__dict__)
    except Exception as e:  # reported per case
        lines = [ln for ln in f"{type(e).__name__}: {e}".splitlines() if ln.strip()]
        text = "\n".join(lines[:3] + ["..."] + lines[-6:] if len(lines) > 12 else lines)
        causes, c = [], e.__cause__ or e.__context__
        while c is not None and len(causes) < 8:  # the frontend wraps the root cause in CompilationErrors
            first = next((ln for ln in str(c).splitlines() if ln.strip()), "")
            causes.append(f"{type(c).__name__}: {first}")
            c = c.__cause__ or c.__context__
        if causes:
            text += "\ncaused by: " + causes[-1]
        return {"error": text, "seconds": time.perf_counter() - t0}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    text = log.getvalue()
    if "spill" not in text:  # from Triton's cache, where ptxas did not run: run it on the cached PTX
        with contextlib.redirect_stdout(log):
            backend.make_cubin(ck.asm["ptx"], {}, backend.parse_options(options.__dict__), target.arch)
        text = log.getvalue()
    ptx = ck.asm["ptx"]
    return {"shared": ck.metadata.shared, **_ptxas_stats(text), "seconds": time.perf_counter() - t0,
            "ptx_ops": {op: len(re.findall(re.escape(op) + r"\b", ptx))
                        for op in ("ex2.approx.f32", "ex2.approx.ftz.f32", "div.full.f32", "div.rn.f32")}}


def _gate(case_ids) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v's log (registers, spills) printed at each compile
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    compiled: dict = {}
    out = {}
    for case in CASES:
        if case.id not in case_ids:
            continue
        try:
            launches = _record_launches(case.op, case.args)
        except Exception as e:  # reported per case
            out[case.id] = {"host_error": f"{type(e).__name__}: {e}"}
            continue
        rows = []
        for kernel, grid, args, meta in launches:
            options, signature, constexprs, attrs = _specialise(backend, kernel, args, meta)
            key = repr((kernel.fn.__qualname__, signature, sorted(constexprs.items()), sorted(attrs.items()),
                        sorted(options.__dict__.items())))
            if key not in compiled:
                compiled[key] = _compile(backend, target, kernel, signature, constexprs, attrs, options)
            consts = {kernel.params[p[0]].name: repr(v) for p, v in constexprs.items()}
            rows.append({"kernel": kernel.fn.__name__, "grid": list(grid), "num_warps": options.num_warps,
                         "constexprs": consts, **compiled[key]})
        out[case.id] = {"launches": rows}
    probe = {}
    options, signature, constexprs, attrs = _specialise(
        backend, _precise_softmax_probe, (torch.empty(0, device="meta"),) * 2, dict(BLOCK_R=64, BLOCK_C=4))
    probe = _compile(backend, target, _precise_softmax_probe, signature, constexprs, attrs, options)
    return {"cases": out, "precise_softmax_probe": probe, "distinct_compiles": len(compiled)}


# ----------------------------------------------------------------------------
# pytest side
# ----------------------------------------------------------------------------


def _compile_api_missing() -> str | None:
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature
    except ImportError as e:
        return f"triton {triton.__version__} lacks the compile API this gate uses: {e}"
    try:
        from triton.backends.nvidia.compiler import CUDABackend
    except ImportError as e:
        return f"triton {triton.__version__} has no NVIDIA backend: {e}"
    return None


@pytest.fixture(scope="session")
def gate(request):
    reason = _compile_api_missing()
    if reason:
        pytest.skip(reason)
    # compile only the cases this session runs
    ids = sorted({item.callspec.params["case"].id for item in request.session.items
                  if getattr(item, "callspec", None) is not None and isinstance(item.callspec.params.get("case"), GateCase)})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-P", __file__, "--json", f.name, *(ids or ["--no-cases"])], env=env,
                              capture_output=True, text=True, timeout=1500, check=False)
        assert proc.returncode == 0, f"compile gate subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        with open(f.name) as fh:
            result = json.load(fh)
    result["wall_seconds"] = time.perf_counter() - t0
    print(f"\nsm_90 compile gate: {result['distinct_compiles']} distinct compiles, {result['wall_seconds']:.0f} s")
    return result


def _describe(row) -> str:
    return f"{row['kernel']} grid={row['grid']} num_warps={row['num_warps']} {row['constexprs']}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_kernels_compile_for_sm90(gate, case):
    res = gate["cases"][case.id]
    assert "host_error" not in res, f"{case.op}{case.args}: host code raised {res.get('host_error')}"
    assert res["launches"], f"{case.op} launched nothing"
    for row in res["launches"]:
        assert "error" not in row, f"{_describe(row)} does not compile for sm_90:\n{row.get('error')}"
        assert row["shared"] <= SHARED_LIMIT, (
            f"{_describe(row)} needs {row['shared']} B of shared memory, more than the {SHARED_LIMIT} B per block "
            f"of an H100/H200")
        for dim, (g, limit) in enumerate(zip(row["grid"], GRID_LIMITS)):
            assert 1 <= g <= limit, f"{_describe(row)}: grid dimension {dim} is {g}, CUDA allows 1..{limit}"


@pytest.mark.parametrize("case", [c for c in CASES if c.bench], ids=[c.id for c in CASES if c.bench])
def test_no_register_spills_at_benchmark_shapes(gate, case):
    for row in gate["cases"][case.id].get("launches", []):
        if "error" in row:
            pytest.fail(f"{_describe(row)} does not compile (see test_kernels_compile_for_sm90)")
        assert row["spill_stores"] is not None, f"{_describe(row)}: no ptxas statistics captured"
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, (
            f"{_describe(row)} spills: {row['spill_stores']} B stores / {row['spill_loads']} B loads per thread "
            f"({row['registers']} registers)")


def test_precise_softmax_uses_libdevice_exp_and_ieee_division(gate):
    """The softmax the focal tile kernels share runs libdevice's expf (whose ex2 is the .ftz form on a
    range-reduced argument) and div.rn, not the ex2.approx.f32 of x log2(e) and the div.full that plain
    tl.exp and `/` compile to."""
    probe = gate["precise_softmax_probe"]
    assert "error" not in probe, probe.get("error")
    ops = probe["ptx_ops"]
    assert ops["ex2.approx.f32"] == 0 and ops["div.full.f32"] == 0, ops
    assert ops["div.rn.f32"] > 0, ops


# ----------------------------------------------------------------------------
# the launch path: every op's launches go through _common.launch, under the tensors' device
# ----------------------------------------------------------------------------


def _first_case(op: str) -> GateCase:
    return next(c for c in CASES if c.op == op)


def test_every_triton_op_is_in_the_gate():
    import importlib

    from fastcascade import _ops

    host = _host_functions()
    ops = {name for stem in _ops.FAMILIES for name in importlib.import_module(f"fastcascade.kernels.{stem}").__all__}
    assert {fn.__name__ for fn in host.values()} == ops, "an op is not registered through _common.triton_op"
    assert set(host) <= {c.op for c in CASES}, "an op has no compile-gate case"


def test_only_the_guarded_launch_path_calls_wrap_triton():
    from pathlib import Path

    from fastcascade import kernels

    for path in Path(kernels.__file__).parent.glob("*.py"):
        if path.name != "_common.py":
            assert "wrap_triton" not in path.read_text(), f"{path.name} launches around _common.launch"


@pytest.mark.parametrize("op", sorted({c.op for c in CASES}))
def test_launches_run_under_the_tensors_device(op, monkeypatch):
    """Triton launches on the current CUDA device: with the inputs on cuda:1 (fake tensors, no GPU
    needed) each launch of the op must happen with cuda:1 made current."""
    from fastcascade.kernels import _common
    from torch._subclasses.fake_tensor import FakeTensorMode

    current = []  # the stack of devices made current by torch.cuda.device
    seen = []

    class Device:  # torch.cuda.device without a driver
        def __init__(self, device):
            self.index = torch.device(device).index

        def __enter__(self):
            current.append(self.index)

        def __exit__(self, *exc):
            current.pop()

    def wrap(kernel):
        class _Grid:
            def __getitem__(self, grid):
                return lambda *a, **kw: seen.append((kernel.fn.__name__, current[-1] if current else None))

        return _Grid()

    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(_common, "wrap_triton", wrap)
    case = _first_case(op)
    host = _host_functions()
    with FakeTensorMode():
        args = [torch.empty(a.shape, dtype=a.dtype, device="cuda:1") if isinstance(a, Meta) else a for a in case.args]
        host[op](*args)
    assert seen, f"{op} launched nothing"
    assert all(dev == 1 for _, dev in seen), f"{op}: launches and the device current at each: {seen}"


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here (else print a table)")
    parser.add_argument("--no-cases", action="store_true", help="compile only the softmax probe")
    parser.add_argument("cases", nargs="*", help="case ids (default: all)")
    ns = parser.parse_args()
    t0 = time.perf_counter()
    res = _gate(set() if ns.no_cases else set(ns.cases) or {c.id for c in CASES})
    if ns.json:
        with open(ns.json, "w") as fh:
            json.dump(res, fh)
    else:
        for cid, r in res["cases"].items():
            for row in r.get("launches", [{"kernel": "-", "error": r.get("host_error")}]):
                print(f"{cid:42s} {row['kernel']:32s} " + (
                    f"ERROR {row['error'].splitlines()[0][:80]}" if "error" in row else
                    f"w={row['num_warps']:2d} shared={row['shared']:6d} regs={row['registers']} "
                    f"spill={row['spill_stores']}/{row['spill_loads']} {row['seconds']:.1f}s"))
        print("probe", res["precise_softmax_probe"].get("ptx_ops", res["precise_softmax_probe"]))
        print(f"{res['distinct_compiles']} distinct compiles in {time.perf_counter() - t0:.0f} s")
