"""python -m fastcascade selftest / fastcascade.selftest(), and scripts/gpu_check.sh.

The selftest is only worth running if it can fail: besides the passing --quick run, these tests break a
backend on purpose (wrong values, a wrong gradient only, one wrong integer, nondeterminism, an exception)
and check that the result names it and the command line exits non-zero.
"""

import functools
import importlib
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import fastcascade as fc
from fastcascade import _ops
from fastcascade.__main__ import main

st = importlib.import_module("fastcascade.selftest")  # the package: fastcascade.selftest is the function
st_cases = importlib.import_module("fastcascade.selftest.cases")
st_run = importlib.import_module("fastcascade.selftest.run")
st_cli = importlib.import_module("fastcascade.selftest.cli")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
ALL_OPS = ["sigmoid_focal", "softmax_focal", "dice_focal", "pooled_adapter", "pixel_adapter", "route_threshold",
           "route_argmax", "route_confident", "partition", "gather_rows", "scatter_rows", "vote", "confusion_matrix"]
CPU_BACKENDS = ["cpu", "torch"] + (["triton"] if _ops.HAS_TRITON else [])


def _env_without_interpreter():
    # conftest sets TRITON_INTERPRET=1 in this process; the child must set it for itself (--quick)
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


# ---------------------------------------------------------------------------------------------
# the passing run


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU --quick run (a GPU machine runs gpu_check.sh)")
def test_quick_cli_passes_and_writes_every_row(tmp_path):
    path = tmp_path / "selftest.json"
    proc = subprocess.run([sys.executable, "-P", "-m", "fastcascade", "selftest", "--quick", "--json", str(path)],
                          cwd=tmp_path, env=_env_without_interpreter(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["selftest.json"]  # the atomic write left no temp file
    data = json.loads(path.read_text())
    assert data["ok"] is True and data["complete"] is True and data["quick"] is True
    # --quick turned the interpreter on by itself, so Triton is among the backends when it is installed
    assert data["backends"] == CPU_BACKENDS
    seen = {(r["op"], r["backend"]) for r in data["rows"]}
    assert seen == {(op, b) for op in ALL_OPS for b in CPU_BACKENDS}
    tiers = {(r["op"], r["tier"]) for r in data["rows"]}
    assert all((op, tier) in tiers for op in ALL_OPS for tier in ("small", "awkward"))
    for r in data["rows"]:
        assert r["ok"] and r["deterministic"] is True and r["agrees"] is True, r
        if r["exact"]:
            assert r["mismatches"] == 0
        else:  # a float row really measured an error against a tolerance
            assert 0 <= r["error"] <= r["tolerance"] < 1, r
    assert {r["dtype"] for r in data["rows"] if r["op"] == "sigmoid_focal"} == {"fp32", "bf16"}
    out = proc.stdout
    assert [c.strip() for c in out.splitlines()[0].split("|")][:4] == ["op", "backend", "shape", "dtype"]
    assert len([ln for ln in out.splitlines() if " | " in ln]) == len(data["rows"]) + 1
    assert out.rstrip().endswith("PASS")


# ---------------------------------------------------------------------------------------------
# broken backends are caught


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward scales the gradient: a kernel whose backward alone is wrong."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * 1.5


def _break(monkeypatch, name, backend, how):
    """Replaces fastcascade.<name> so that calls with backend=`backend` return what how(original, args, kw)
    gives; other backends run the real op."""
    original = getattr(fc, name)

    @functools.wraps(original)
    def broken(*args, **kw):
        if kw.get("backend") == backend:
            return how(original, args, kw)
        return original(*args, **kw)

    monkeypatch.setattr(fc, name, broken)


# Large enough to fail the bf16 rows too: the tolerance floor of 16 eps is 12.5% in bf16.
def _wrong_value(original, args, kw):
    return original(*args, **kw) * 1.5


def _wrong_grad(original, args, kw):
    return original(_ScaleGrad.apply(args[0]), *args[1:], **kw)


def _raises(original, args, kw):
    raise RuntimeError("kernel exploded")


def _flaky():
    calls = {"n": 0}

    def how(original, args, kw):  # every other call one ulp off: agrees with the reference, not with itself
        calls["n"] += 1
        out = original(*args, **kw)
        if calls["n"] % 2:
            return out
        o = out.detach()
        return out + (torch.nextafter(o, torch.full_like(o, math.inf)) - o)  # differentiable, exactly 1 ulp up

    return how


BREAKERS = [("value", _wrong_value, "DISAGREES", "loss: error"), ("grad", _wrong_grad, "DISAGREES", "grad logits: error"),
            ("raises", _raises, "ERROR", "kernel exploded"),
            ("nondeterministic", _flaky(), "NONDETERMINISTIC", "two runs differ in loss")]


@pytest.mark.parametrize("backend", CPU_BACKENDS[:1] + CPU_BACKENDS[2:])
@pytest.mark.parametrize("kind,how,status,why", BREAKERS, ids=[b[0] for b in BREAKERS])
def test_a_broken_loss_backend_is_flagged(monkeypatch, backend, kind, how, status, why):
    _break(monkeypatch, "sigmoid_focal_loss", backend, how)
    result = fc.selftest(device="cpu", quick=True, ops=["sigmoid_focal"])
    assert result.complete and not result.ok
    broken = [r for r in result.rows if r.backend == backend]
    others = [r for r in result.rows if r.backend != backend]
    assert broken and others and all(r.ok for r in others)  # only the broken backend is flagged
    for r in broken:
        assert not r.ok and r.status == status and why in r.failure, (r.status, r.failure)
    assert {(r.op, r.backend) for r in result.failures} == {("sigmoid_focal", backend)}
    table = result.table()
    assert sum(status in ln for ln in table.splitlines()) == len(broken)
    assert result.summary().endswith("FAIL")


def test_one_wrong_integer_is_flagged(monkeypatch):
    def off_by_one(original, args, kw):
        out = original(*args, **kw).clone()
        out[-1] += 1
        return out

    _break(monkeypatch, "route_argmax", "cpu", off_by_one)
    result = fc.selftest(device="cpu", quick=True, ops="route_argmax")
    bad = [r for r in result.rows if r.backend == "cpu"]
    assert bad and all(r.status == "DISAGREES" and r.mismatches == 1 and "1 of" in r.failure for r in bad)
    assert all(r.ok for r in result.rows if r.backend != "cpu")
    assert "1 differ" in result.table()


def test_a_reference_that_cannot_run_fails_its_rows_and_the_run_goes_on(monkeypatch):
    from fastcascade import reference

    original = reference.sigmoid_focal_loss

    def out_of_memory(x, *args, **kw):
        if x.dtype == torch.float64:
            raise RuntimeError("out of memory (pretend)")
        return original(x, *args, **kw)

    monkeypatch.setattr(reference, "sigmoid_focal_loss", out_of_memory)
    result = fc.selftest(device="cpu", quick=True, ops=["sigmoid_focal", "route_argmax"])
    assert result.complete and not result.ok
    for r in result.rows:
        if r.op == "sigmoid_focal":  # nothing could be checked, so nothing passes
            assert r.status == "ERROR" and "the reference could not run" in r.failure, r
        else:
            assert r.ok, r


def test_the_command_line_exits_nonzero_on_a_broken_backend(monkeypatch, capsys, tmp_path):
    _break(monkeypatch, "softmax_focal_loss", "cpu", _wrong_value)
    # the command line runs every op; keep this test to one
    monkeypatch.setattr(st_cli, "selftest", functools.partial(st.selftest, ops=["softmax_focal"]))
    path = tmp_path / "out.json"
    assert main(["selftest", "--quick", "--device", "cpu", "--json", str(path)]) == 1
    out = capsys.readouterr().out
    assert "DISAGREES" in out and out.rstrip().endswith("FAIL")
    data = json.loads(path.read_text())
    assert data["ok"] is False and any(not r["ok"] and r["backend"] == "cpu" for r in data["rows"])


def test_a_nan_is_never_within_tolerance():
    ref = torch.randn(10, dtype=torch.float64)
    a = ref.float().clone()
    assert st.rel_err(a, ref) <= st.tolerance(0.0, torch.float32)
    a[3] = math.nan
    assert st.rel_err(a, ref) == math.inf
    assert not st.rel_err(a, ref) <= st.tolerance(1.0, torch.float32)


def test_timing_columns_are_filled():
    """The timing code that selftest runs on CUDA, run here on the CPU (median_seconds takes the wall
    clock there): every backend's time, the eager reference, torch.compile of the reference, and the
    bytes behind the copy-bandwidth fraction."""
    dev = torch.device("cpu")
    case = next(c for c in st_cases.all_cases(True, dev) if c.op == "sigmoid_focal" and c.shape == "64x37 mean"
                and c.dtype == torch.float32)
    rows = st_run._check_case(case, ["cpu", "torch"], dev, 0, samples=1)
    assert all(r.ok for r in rows)
    st_run._time_case(case, rows, dev, 0, bw=1e10)
    st_run._time_compiled(case, rows, dev, 0)
    n = 64 * 37
    for r in rows:
        assert r.ms > 0 and r.eager_ms > 0 and r.compile_ms > 0, r
        assert r.vs_eager == pytest.approx(r.eager_ms / r.ms) and r.vs_compile == pytest.approx(r.compile_ms / r.ms)
        assert r.bytes == 4 * n + 4 * n + 4 + 4 * n  # logits and targets read; loss and grad written
        assert r.frac_copy_bw == pytest.approx(r.bytes / (r.ms / 1e3) / 1e10)
    table = st.SelftestResult("cpu", "cpu", True, ["cpu", "torch"], {}, rows, {}, complete=True).table()
    assert len(re.findall(r"\| \d+\.\d\dx +\| \d+\.\d\dx +\| \d+% ", table)) == 2, table


# ---------------------------------------------------------------------------------------------
# bad arguments


@pytest.mark.parametrize("argv,message", [
    (["--device", "tpu"], "device must be 'cpu', 'cuda' or 'cuda:N'"),
    (["--device", "meta"], "device must be 'cpu', 'cuda' or 'cuda:N'"),
    (["--json", "/nonexistent-folder/x.json"], "does not exist"),
    (["--timing-budget", "-1"], "timing_budget must be a number of seconds >= 0"),
])
def test_bad_arguments_give_clear_errors(capsys, argv, message):
    assert main(["selftest", "--quick"] + argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m fastcascade selftest: error:") and message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(capsys):
    assert main(["selftest", "--device", "cuda"]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err


def test_json_path_that_is_a_folder_and_unknown_flags(capsys, tmp_path):
    assert main(["selftest", "--json", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["selftest", "--fast"])
    assert e.value.code == 2 and "unrecognized arguments: --fast" in capsys.readouterr().err


def test_unknown_op_lists_the_ops():
    with pytest.raises(ValueError, match="unknown op.*'nope'.*sigmoid_focal"):
        fc.selftest(device="cpu", ops=["nope"])


# ---------------------------------------------------------------------------------------------
# scripts/gpu_check.sh

PHASES = {"DEVICE", "BUILD", "SELFTEST", "TESTS", "SANITIZE", "BENCH", "LATENCY", "REPORT"}
OUT_FILES = {"device.txt", "build.log", "selftest.json", "selftest.txt", "tests.log", "bench.json", "bench_table.md",
             "latency.txt", "latency.json", "summary.txt"}


def _budgets():
    text = SCRIPT.read_text()
    budgets = {m[1]: int(m[2]) for m in re.finditer(r"^BUDGET_(\w+)=\$\{BUDGET_\1:-(\d+)\}", text, re.M)}
    grace = int(re.search(r"^GRACE=\$\{GRACE:-(\d+)\}", text, re.M)[1])
    return text, budgets, grace


def test_gpu_check_syntax_and_budget():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text, budgets, grace = _budgets()
    assert set(budgets) == PHASES
    # every phase gets at most its budget plus the grace between SIGTERM and SIGKILL
    assert sum(budgets.values()) + grace * len(budgets) < 8 * 60, budgets
    for name in budgets:  # each budget is used, not only declared
        assert text.count(f'"$BUDGET_{name}"') >= 1, name
    # no phase runs outside a budget: every timeout takes one
    for line in text.splitlines():
        if re.match(r"\s*timeout ", line):
            assert re.search(r'timeout -k "\$GRACE" "\$(budget|BUDGET_\w+)"', line), line
    # bench/README.md documents the same budgets
    readme = (ROOT / "bench" / "README.md").read_text()
    documented = {m[1].upper(): int(m[2]) for m in re.finditer(r"^\| (\w+) \| (\d+) s \|", readme, re.M)}
    assert documented == budgets


FAKE_PYTHON = r"""#!/usr/bin/env bash
# Stands in for python3 in scripts/gpu_check.sh: fakes the build, the selftest, pytest; real Python otherwise.
case "$*" in
  *"-m pip install"*) echo "fake build" ;;
  *"-m fastcascade selftest"*)  # like the real one: the JSON holds the rows done so far, then the run ends
    while [ "$1" != --json ]; do shift; done; json=$2
    complete=false; [ "${FAKE_SELFTEST_SLEEP:-0}" = 0 ] && complete=true
    echo '{"rows": [{"ok": false, "status": "DISAGREES", "op": "vote", "backend": "cuda", "shape": "3x4",
           "dtype": "fp32", "failure": "labels: 1 of 12 elements differ"}], "complete": '$complete'}' > "$json"
    sleep "${FAKE_SELFTEST_SLEEP:-0}"
    echo "fake selftest table" ;;
  *"-m pytest tests"*) echo "fake tests: 3 passed" ;;
  *"-m pytest bench"*)
    for a in "$@"; do case $a in --benchmark-json=*) json=${a#*=} ;; bench/*) file=$a ;; esac; done
    echo "{\"datetime\": \"2026-01-01\", \"benchmarks\": [{\"group\": \"$file\", \"name\": \"n\",
      \"params\": {\"impl\": \"fake\"}, \"extra_info\": {\"median_ms\": 1.0, \"gbps\": 1.0, \"frac_copy_bw\": 0.5,
      \"peak_extra_mb\": 0, \"device\": \"fake\", \"torch\": \"x\", \"copy_bw_gbps\": 2.0}}]}" > "$json" ;;
  *"bench/latency_check.py"*)
    while [ "$1" != --json ]; do shift; done
    echo '{"worst": 0.05}' > "$2"; echo "fake latency check" ;;
  *"import xdist"*) exit 1 ;;
  *) exec "$REAL_PYTHON" "$@" ;;
esac
"""


def _fake_run(tmp_path, sanitizer=True, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python3").write_text(FAKE_PYTHON)
    if sanitizer:  # (none is installed on the CPU machines: without this one, the phase is skipped)
        (bin_dir / "compute-sanitizer").write_text(
            "#!/usr/bin/env bash\necho \"fake compute-sanitizer $*\"; [ \"${FAKE_SANITIZER_RC:-0}\" = 0 ]\n")
    (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'name, memory.total'; echo 'Fake GPU, 1 MiB'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    out = tmp_path / "out"
    # the device phase runs the real Python: a generous budget here, where other jobs share the cores
    full_env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(out), REAL_PYTHON=sys.executable,
                    BUDGET_DEVICE="60", **env)
    proc = subprocess.run(["bash", str(SCRIPT)], env=full_env, capture_output=True, text=True, timeout=300)
    return proc, out


def test_gpu_check_records_an_overrun_and_goes_on(tmp_path):
    proc, out = _fake_run(tmp_path, BUDGET_SELFTEST="1", FAKE_SELFTEST_SLEEP="20")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    files = set(os.listdir(out))
    assert files <= OUT_FILES and len(files) <= 10, files
    assert files == OUT_FILES
    summary = (out / "summary.txt").read_text()
    assert re.search(r"^selftest\s+OVERRAN its budget\s+\d+ / 1$", summary, re.M), summary
    for phase in ("device", "build", "tests", "sanitize", "bench", "latency"):  # the phases after the overrun ran
        assert re.search(rf"^{phase}\s+ok\b", summary, re.M), summary
    assert "fake tests: 3 passed" in (out / "tests.log").read_text()
    assert "selftest: 1 rows, 1 failing, run cut short" in summary  # the rows written before the cut are named
    table = (out / "bench_table.md").read_text()
    for name in ("focal", "pooled_adapter", "pixel_adapter", "dice_focal", "cascade"):  # one row per file, merged
        assert f"bench/test_bench_{name}.py" in table
    assert summary.rstrip().endswith("gpu_check: FAIL")


def test_gpu_check_passes_when_every_phase_does_and_reports_failing_rows(tmp_path):
    proc, out = _fake_run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    assert summary.rstrip().endswith("gpu_check: PASS") and "OVERRAN" not in summary
    # the failing row of selftest.json is named in the summary (here the fake run exits 0 regardless)
    assert "DISAGREES: vote cuda 3x4 fp32: labels: 1 of 12 elements differ" in summary
    assert "Fake GPU" in (out / "device.txt").read_text()
    log = (out / "tests.log").read_text()
    for tool in ("memcheck", "racecheck"):  # both tools, each on the sanitize cases
        assert f"fake compute-sanitizer --tool {tool}" in log and "scripts/sanitize_cases.py" in log


def test_gpu_check_names_a_missing_or_failing_sanitizer(tmp_path):
    proc, out = _fake_run(tmp_path / "absent", sanitizer=False)
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 1 and re.search(r"^sanitize\s+skipped \(no compute-sanitizer\)", summary, re.M), summary
    proc, out = _fake_run(tmp_path / "failing", FAKE_SANITIZER_RC="1")
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 1 and re.search(r"^sanitize\s+FAILED \(exit 1\)", summary, re.M), summary
    assert re.search(r"^bench\s+ok\b", summary, re.M)  # the phases after it still ran


def test_gpu_check_names_only_paths_and_markers_that_exist():
    """A renamed bench file or test marker must fail here, not silently on the GPU machine."""
    text = SCRIPT.read_text()
    loop = re.search(r"^for name in ([\w ]+); do\n(?:.*\n){0,8}?.*bench/test_bench_\$name\.py", text, re.M)
    assert loop, "the bench loop"
    names = loop[1].split()
    for name in names:
        assert (ROOT / "bench" / f"test_bench_{name}.py").is_file(), name
        assert "headline" in (ROOT / "bench" / f"test_bench_{name}.py").read_text(), name
    with_headline = {p.stem.removeprefix("test_bench_") for p in (ROOT / "bench").glob("test_bench_*.py")
                     if "headline" in p.read_text()}
    assert with_headline == set(names)  # and no headline benchmark is left out of the GPU check
    paths = set(re.findall(r"\b((?:scripts|bench|tests)/[\w./]+\.(?:py|sh))\b", text))
    assert "scripts/sanitize_cases.py" in paths and "bench/report.py" in paths
    for path in paths:
        assert (ROOT / path).is_file(), path
    declared = {m.split(":")[0] for m in __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())
                ["tool"]["pytest"]["ini_options"]["markers"]}
    for marker in re.findall(r"-m pytest [^\n]*?-m (\w+)", text):
        assert marker in declared, marker


def test_sanitize_cases_run_one_small_case_of_every_op():
    proc = subprocess.run([sys.executable, "-P", str(ROOT / "scripts" / "sanitize_cases.py"), "--backend", "cpu"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ops = [ln.split()[1] for ln in proc.stdout.splitlines()]
    assert sorted(ops) == sorted(ALL_OPS)


def test_headline_marker_selects_the_gpu_check_benchmarks():
    proc = subprocess.run([sys.executable, "-P", "-m", "pytest", "bench", "--collect-only", "-q", "-m", "headline",
                           "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ids = [ln for ln in proc.stdout.splitlines() if "::" in ln]
    for test in ("test_sigmoid_focal_fwd_bwd", "test_softmax_focal_fwd_bwd", "test_pooled_adapter_fwd_bwd",
                 "test_token_adapter", "test_dice_focal_fwd_bwd", "test_av1_cascade_throughput"):
        assert any(f"::{test}[" in i for i in ids), test
    assert not any("test_stage2_training_step" in i or "test_confusion_matrix" in i or "partition_gather" in i
                   for i in ids)
    assert not any("test_softmax_focal_fwd_bwd[" in i and "-16]" in i for i in ids)  # C = 16 is not a headline
