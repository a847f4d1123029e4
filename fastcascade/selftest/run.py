"""selftest(): every case on every backend available here, correctness first, then timing on CUDA."""

from __future__ import annotations

import contextlib
import os
import pathlib
import sys
import time
import warnings
import zlib
from collections.abc import Sequence

import torch

from .. import _ops
from .._checks import bitwise_equal
from .._io import write_json
from .cases import DTYPE_NAMES, Case, all_cases, public_api
from .execute import Upstream, bind, execute, mismatches, step
from .report import SelftestResult, SelftestRow, fmt_sci
from .timing import copy_bandwidth, median_seconds
from .tolerance import reference_errors, rel_err, tolerance

# ---------------------------------------------------------------------------------------------
# the run


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r} ({e})") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA device is visible (torch.cuda.is_available() is "
                             f"False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are "
                             f"visible")
    return dev


def _backends(device: torch.device, quick: bool) -> tuple[list, dict]:
    """The backends to check on `device`, and the reason for each one left out."""
    run, skipped = [], {}
    if device.type == "cpu":
        run += ["cpu", "torch"]
        if not _ops.HAS_TRITON:
            skipped["triton"] = "the triton package is not installed"
        else:
            if quick and not torch.cuda.is_available() and "fastcascade.kernels" not in sys.modules:
                # Triton reads TRITON_INTERPRET when its kernels are decorated: set before they are imported
                os.environ["TRITON_INTERPRET"] = "1"
            if os.environ.get("TRITON_INTERPRET") != "1":
                skipped["triton"] = ("Triton runs on CPU tensors only under the interpreter: set "
                                     "TRITON_INTERPRET=1 before Python starts, or use --quick")
            else:
                run.append("triton")
        skipped["cuda"] = "no CUDA device here" if not torch.cuda.is_available() else "run with --device cuda"
    else:
        if _ops.CUDA_COMPILED:
            run.append("cuda")
        else:
            skipped["cuda"] = "this build has no CUDA kernels (rebuild with FASTCASCADE_FORCE_CUDA=1)"
        if _ops.HAS_TRITON:
            run.append("triton")
        else:
            skipped["triton"] = "the triton package is not installed"
        run.append("torch")
        skipped["cpu"] = "run with --device cpu"
    return run, skipped


def _environment(device: torch.device) -> dict:
    env = {"fastcascade": getattr(public_api(), "__version__", "?"), "torch": torch.__version__,
           "python": sys.version.split()[0], "cuda_compiled": _ops.CUDA_COMPILED,
           "has_triton": _ops.HAS_TRITON,
           "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1", "threads": torch.get_num_threads()}
    if _ops.HAS_TRITON:
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError as e:
            env["triton"] = f"import failed: {e}"
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
    return env


def _seed(case: Case, seed: int) -> int:
    return (zlib.crc32(case.key.encode()) + seed) % (2**62)


def _check_case(case: Case, backends: Sequence[str], device: torch.device, seed: int, samples: int) -> list:
    """The rows of one case: each backend run twice against the reference (exact outputs) and the float64
    truth under the tolerance model (float outputs)."""
    rows = [SelftestRow(case.op, backend, str(device), case.tier, case.shape, DTYPE_NAMES[case.dtype],
                        exact=not case.float_outputs, agrees=False, deterministic=None) for backend in backends]
    try:
        gen = torch.Generator(device=device).manual_seed(_seed(case, seed))
        inputs = case.make(gen, device)
        up = Upstream(_seed(case, seed) + 1)
        want = execute(case, "reference", inputs, up)  # the reference in the backends' dtypes
        truth = ref_err = None
        if case.float_outputs:
            inputs64 = [t.to(torch.float64) if t.is_floating_point() else t for t in inputs]
            truth = execute(case, "reference", inputs64, up)
            ref_err = reference_errors(lambda *a: execute(case, "reference", list(a), up), inputs64, case.dtype,
                                       samples=samples, generator=gen)
    except Exception as e:  # e.g. out of memory at a benchmark size: nothing checked, so no row passes
        for row in rows:
            row.failure = f"the reference could not run: {type(e).__name__}: {_first_line(e)}"[:300]
        return rows
    names = case.all_outputs
    for row in rows:
        backend = row.backend
        try:
            first = execute(case, backend, inputs, up)
            second = execute(case, backend, inputs, up)
        except Exception as e:  # a backend that raises on valid input fails its row; the run goes on
            row.failure = f"{type(e).__name__}: {_first_line(e)}"[:300]
            continue
        row.deterministic = all(bitwise_equal(a, b) for a, b in zip(first, second))
        problems, worst_ratio = [], -1.0
        for j, (name, out, w) in enumerate(zip(names, first, want)):
            if out.shape != w.shape or out.dtype != w.dtype:
                problems.append(f"{name}: {tuple(out.shape)} {out.dtype}, expected {tuple(w.shape)} "
                                f"{w.dtype}")
                continue
            if name in case.exact:
                n = mismatches(out, w)
                row.mismatches += n
                if n:
                    problems.append(f"{name}: {n} of {w.numel()} elements differ from the reference")
                continue
            err, tol = rel_err(out, truth[j]), tolerance(ref_err[j], out.dtype)
            ratio = err / tol
            if ratio > worst_ratio:
                worst_ratio, row.error, row.tolerance, row.worst = ratio, err, tol, name
            if not err <= tol:
                problems.append(f"{name}: error {fmt_sci(err)} > tolerance {fmt_sci(tol)} (reference error "
                                f"{fmt_sci(ref_err[j])})")
        row.agrees = not problems
        if not row.deterministic:
            differ = [n for n, a, b in zip(names, first, second) if not bitwise_equal(a, b)]
            problems.append(f"two runs differ in {', '.join(differ)}")
        row.failure = "; ".join(problems) or None
    return rows


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""


def _timing_inputs(case: Case, device: torch.device, seed: int):
    gen = torch.Generator(device=device).manual_seed(_seed(case, seed))
    return case.make(gen, device), Upstream(_seed(case, seed) + 1)  # the correctness pass's inputs


def _seconds(case: Case, impl: str, inputs: list, up: Upstream, compiled=None) -> float:
    leaves, forward = bind(case, impl, inputs, compiled)
    device = next(t.device for t in inputs if isinstance(t, torch.Tensor))
    return median_seconds(lambda: step(leaves, forward, up), 20 if case.tier == "bench" else 10, device=device)


def _time_case(case: Case, rows: list, device: torch.device, seed: int, bw: float) -> None:
    """Fills the time columns of one case's rows: each backend and the eager reference, one forward +
    backward each, and the fraction of the copy bandwidth (bytes: each input read once, each output and
    gradient written once)."""
    inputs, up = _timing_inputs(case, device, seed)
    try:
        eager = _seconds(case, "reference", inputs, up)
    except Exception as e:
        eager = None
        for row in rows:
            row.note = f"eager reference failed: {type(e).__name__}: {e}"[:200]
    out_bytes = sum(t.numel() * t.element_size() for t in execute(case, "reference", inputs, up))
    in_bytes = sum(v.numel() * v.element_size()
                   for v in (case.views[i](t) if i in case.views else t for i, t in enumerate(inputs)))
    for row in rows:
        if row.deterministic is None:  # the backend raised: nothing to time
            continue
        try:
            s = _seconds(case, row.backend, inputs, up)
        except Exception as e:
            row.note = f"timing failed: {type(e).__name__}: {e}"[:200]
            continue
        row.ms, row.bytes = s * 1e3, in_bytes + out_bytes
        row.frac_copy_bw = row.bytes / s / bw
        if eager:
            row.eager_ms, row.vs_eager = eager * 1e3, eager / s


def _time_compiled(case: Case, rows: list, device: torch.device, seed: int) -> None:
    """torch.compile of the reference, against each timed row of the case."""
    inputs, up = _timing_inputs(case, device, seed)
    try:
        compiled = _seconds(case, "compile", inputs, up, torch.compile(case.ref, dynamic=False))
    except Exception as e:  # the baseline failing to compile is not the backend's fault
        for row in rows:
            row.note = f"torch.compile of the reference failed: {type(e).__name__}: {_first_line(e)}"[:200]
        return
    for row in rows:
        if row.ms is not None:
            row.compile_ms, row.vs_compile = compiled * 1e3, compiled / (row.ms / 1e3)


def selftest(device=None, quick: bool = False, json_path=None, *, ops: Sequence[str] | None = None,
             timing_budget: float | None = None, progress: bool | None = None,
             seed: int = 0) -> SelftestResult:
    """Check every op on every backend available on `device` against fastcascade.reference.

    Args:
        device: "cpu", "cuda" or "cuda:N" (default: cuda when visible, else cpu).
        quick: the CI run: small and awkward shapes, fewer dtypes, no torch.compile timing; without a GPU it
            sets TRITON_INTERPRET=1 for this process so the Triton kernels run under the interpreter.
        json_path: also write the result as JSON there (atomically, after every row).
        ops: check only these ops (names as in the table, e.g. ["sigmoid_focal", "vote"]).
        timing_budget: seconds from the start after which no further timing starts (CUDA); the correctness
            rows always run, untimed rows show "-". For a run that must fit a time slot.
        progress: a tqdm bar on stderr (default: when stderr is a terminal).
        seed: inputs are drawn from generators seeded by (op, shape, dtype) and this.
    Returns a SelftestResult: print() it for the table; .ok, .failures, .to_dict().
    """
    t0 = time.perf_counter()
    dev = _resolve_device(device)
    path = None
    if json_path is not None:
        path = pathlib.Path(json_path)
        if path.is_dir():
            raise ValueError(f"json_path {str(path)!r} is a folder; give a file path")
        if not path.parent.is_dir():
            raise ValueError(f"json_path {str(path)!r}: the folder {str(path.parent)!r} does not exist")
    cases = all_cases(quick, dev)
    if timing_budget is not None and not timing_budget >= 0:
        raise ValueError(f"timing_budget must be a number of seconds >= 0, got {timing_budget!r}")
    if ops is not None:
        ops = [ops] if isinstance(ops, str) else list(ops)
        known = sorted({c.op for c in all_cases(False, torch.device("cpu"))})
        unknown = [o for o in ops if o not in known]
        if unknown:
            raise ValueError(f"unknown op(s) {unknown}; the ops are {known}")
        cases = [c for c in cases if c.op in ops]
    backends, skipped = _backends(dev, quick)
    if "triton" in backends:
        _ops.load_triton_ops()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (_cpu_name() or "cpu")
    result = SelftestResult(str(dev), name, quick, backends, skipped, [], _environment(dev))

    def save():
        result.elapsed_s = time.perf_counter() - t0
        if path is not None:
            write_json(result.to_dict(), path, default=str)

    from tqdm.auto import tqdm

    timed = dev.type == "cuda"
    compiled = [c for c in cases if c.tier == "bench"] if timed else []  # compile costs seconds per shape
    bar = tqdm(total=len(cases) * (2 if timed else 1) + len(compiled), desc="selftest", unit="case",
               file=sys.stderr, disable=None if progress is None else not progress)
    per_case = []
    on_device = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    with on_device, warnings.catch_warnings():
        # the interpreter evaluates inf - inf on the NaN / inf rows the routing cases hold on purpose
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton")
        for case in cases:
            bar.set_postfix_str(case.key, refresh=False)
            rows = _check_case(case, backends, dev, seed, samples=2 if case.tier == "bench" else 4)
            result.rows += rows
            per_case.append((case, rows))
            for r in rows:
                if not r.ok:
                    tqdm.write(f"FAIL {r.op} {r.backend} {r.shape} {r.dtype}: {r.failure}", file=sys.stderr)
            save()
            bar.update()
        if timed:
            result.copy_bandwidth_gbps = copy_bandwidth(dev) / 1e9
            # every row's time first, then torch.compile of the reference at the benchmark shapes
            work = [(c, rows, False) for c, rows in per_case] + [(c, rows, True) for c, rows in per_case
                                                                  if c.tier == "bench"]
            for case, rows, with_compile in work:
                if timing_budget is not None and time.perf_counter() - t0 > timing_budget:
                    result.timing_cut = True
                    bar.update()
                    continue
                bar.set_postfix_str(("compile " if with_compile else "time ") + case.key, refresh=False)
                try:
                    if with_compile:
                        _time_compiled(case, rows, dev, seed)
                    else:
                        _time_case(case, rows, dev, seed, result.copy_bandwidth_gbps * 1e9)
                except Exception as e:  # e.g. out of memory: the times stay "-", correctness is unaffected
                    for row in rows:
                        row.note = f"timing failed: {type(e).__name__}: {_first_line(e)}"[:200]
                save()
                bar.update()
    bar.close()
    result.complete = True
    save()
    return result


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
