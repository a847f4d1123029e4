#!/usr/bin/env bash
# One call on a lent GPU machine (no package registry there; time on it is short): build against its
# torch, `python -m fastcascade selftest` first (a broken kernel is named within minutes), then the
# gpu-marked tests, then compute-sanitizer (memcheck and racecheck on one small case of every op: the
# hardware twin of the CUDA emulation in tests/), then the headline benchmarks. Each phase runs under its own time budget (`timeout`);
# a phase that fails or overruns is recorded in summary.txt and the script goes on to the next one.
# Everything is written under $OUT as it goes, at most these 8 files:
#   device.txt      GPU, driver, versions, which optional packages are importable
#   build.log       pip install output
#   selftest.json   python -m fastcascade selftest --json (rewritten after every row: a cut run keeps its rows)
#   selftest.txt    its table and summary
#   tests.log       pytest -m gpu, compute-sanitizer's output, then the benchmark runs' pytest output
#   bench.json      pytest-benchmark JSON of the headline benchmarks (merged after each benchmark file)
#   bench_table.md  bench/report.py of bench.json
#   summary.txt     each phase's outcome, time and budget; failing selftest rows and tests; PASS / FAIL
#
#   run: OUT=/some/dir bash scripts/gpu_check.sh        (OUT defaults to ./gpu-out; exit 0 when all passed)
#
# Phase budgets in seconds. Their sum plus the kill grace of each phase stays under 8 minutes (480 s);
# tests/test_selftest.py parses these lines and checks it, so the total cannot grow unnoticed. Each can be
# overridden from the environment (BUDGET_BUILD=300 ...) for a slower machine.
BUDGET_DEVICE=${BUDGET_DEVICE:-10}      # nvidia-smi, torch / triton versions, optional packages
BUDGET_BUILD=${BUDGET_BUILD:-140}       # pip install with MAX_JOBS=16: 6 .cu and 7 .cpp files in parallel
BUDGET_SELFTEST=${BUDGET_SELFTEST:-85}  # correctness of every op and backend first, then CUDA-event timing
                                        # (torch.compile of the reference only at the benchmark shapes),
                                        # which stops starting new timings 30 s before the budget ends
BUDGET_TESTS=${BUDGET_TESTS:-65}        # pytest -m gpu (pytest-xdist workers when it is installed)
BUDGET_SANITIZE=${BUDGET_SANITIZE:-55}  # compute-sanitizer memcheck, then racecheck: scripts/sanitize_cases.py
BUDGET_BENCH=${BUDGET_BENCH:-60}        # pytest -m headline, one bench file after another until spent
BUDGET_LATENCY=${BUDGET_LATENCY:-35}    # bench/latency_check.py: the latency model predicted against measured
BUDGET_REPORT=${BUDGET_REPORT:-5}       # summary.txt
GRACE=${GRACE:-3}                       # seconds between timeout's SIGTERM and its SIGKILL
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
summary="$out/summary.txt"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
status=0
printf '%-12s %-34s %s\n' phase outcome "seconds / budget" > "$summary"

record() {  # record NAME RC SECONDS BUDGET: one line of summary.txt
  local outcome
  case $2 in
    0) outcome=ok ;;
    124 | 137) outcome="OVERRAN its budget" ;;
    skip) outcome="skipped (no time left)" ;;
    absent) outcome="skipped (no compute-sanitizer)" ;;
    *) outcome="FAILED (exit $2)" ;;
  esac
  [ "$2" = 0 ] || status=1
  printf '%-12s %-34s %4d / %d\n' "$1" "$outcome" "$3" "$4" | tee -a "$summary"
}

phase() {  # phase NAME BUDGET LOG CMD...: CMD under its budget, output appended to LOG
  local name=$1 budget=$2 log=$3 t0=$SECONDS rc
  shift 3
  echo "== $name: $* (budget ${budget} s)" >> "$log"
  timeout -k "$GRACE" "$budget" "$@" >> "$log" 2>&1
  rc=$?
  record "$name" "$rc" $((SECONDS - t0)) "$budget"
  return "$rc"
}

device_info() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  echo "cpus: $(nproc)"
  python3 - <<'EOF'
import importlib.metadata, importlib.util, sys
def version(name):  # from the installed metadata: importing torch and triton here would cost seconds
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "MISSING"
print("python", sys.version.split()[0], "| torch", version("torch"), "| triton", version("triton"))
mods = ["torchvision", "timm", "skimage", "sklearn", "matplotlib", "tqdm", "pytest_benchmark", "xdist", "monai",
        "expecttest"]
found = {m: "yes" if importlib.util.find_spec(m) else "MISSING" for m in mods}
print("optional packages:", ", ".join(f"{m} {v}" for m, v in found.items()))
EOF
}
export -f device_info
phase device "$BUDGET_DEVICE" "$out/device.txt" bash -c device_info
cat "$out/device.txt"

phase build "$BUDGET_BUILD" "$out/build.log" \
  env FASTCASCADE_FORCE_CUDA=1 python3 -m pip install --no-build-isolation --no-deps . || tail -40 "$out/build.log"

# -P keeps the source tree off sys.path: the installed build (with _C) is what runs. No timing starts in the
# last 30 s of the budget (a torch.compile in flight can take that long), so the correctness rows and the
# times taken so far end inside it.
timing_budget=$((BUDGET_SELFTEST > 30 ? BUDGET_SELFTEST - 30 : 0))
phase selftest "$BUDGET_SELFTEST" "$out/selftest.txt" \
  python3 -P -m fastcascade selftest --json "$out/selftest.json" --timing-budget "$timing_budget"
tail -25 "$out/selftest.txt"

# A test module that cannot import here (a package missing on this machine) must not stop the others.
workers=()
python3 -c "import xdist" 2> /dev/null && workers=(-n 8)
phase tests "$BUDGET_TESTS" "$out/tests.log" \
  python3 -P -m pytest tests -m gpu -v -p no:cacheprovider -rfE --continue-on-collection-errors "${workers[@]}"
tail -15 "$out/tests.log"

# Out-of-bounds accesses and shared-memory races that only the hardware shows (the emulation in tests/
# runs the same kernels on the CPU); one small case of every op, forward and backward.
sanitize() {
  compute-sanitizer --tool memcheck --error-exitcode 1 python3 -P scripts/sanitize_cases.py \
    && compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 1 \
      python3 -P scripts/sanitize_cases.py
}
export -f sanitize
if command -v compute-sanitizer > /dev/null; then
  phase sanitize "$BUDGET_SANITIZE" "$out/tests.log" bash -c sanitize
else
  record sanitize absent 0 "$BUDGET_SANITIZE"
fi

# Headline benchmarks, one file at a time so that a file cut off by the budget keeps the ones before it.
bench_tmp=$(mktemp -d)
bench_end=$((SECONDS + BUDGET_BENCH))
t0=$SECONDS
bench_rc=0
for name in focal pooled_adapter pixel_adapter dice_focal cascade; do
  left=$((bench_end - SECONDS))
  if [ "$left" -le 0 ]; then
    record "  $name" skip 0 0
    bench_rc=124
    continue
  fi
  phase "  $name" "$left" "$out/tests.log" python3 -P -m pytest "bench/test_bench_$name.py" -m headline \
    --benchmark-only -q -p no:cacheprovider --benchmark-json="$bench_tmp/$name.json" \
    --benchmark-columns=median --benchmark-sort=name || bench_rc=$?
  python3 - "$out/bench.json" "$bench_tmp"/*.json <<'EOF' \
    && python3 bench/report.py "$out/bench.json" > "$out/bench_table.md"
import json, os, sys
merged = None
for path in sys.argv[2:]:
    try:
        data = json.load(open(path))
    except (OSError, ValueError):
        continue  # a run killed before pytest-benchmark wrote its file
    if merged is None:
        merged = data
    else:
        merged["benchmarks"] += data["benchmarks"]
if merged is not None:
    tmp = sys.argv[1] + ".tmp"
    json.dump(merged, open(tmp, "w"), indent=1)
    os.replace(tmp, sys.argv[1])
EOF
done
record bench "$bench_rc" $((SECONDS - t0)) "$BUDGET_BENCH"
rm -rf "$bench_tmp"
[ -f "$out/bench_table.md" ] && cat "$out/bench_table.md"

# The latency model on this device: the demo's CNN with a trunk gate and a raw-block gate at several exit
# fractions, and one design tuned on latency, predicted against measured (CUDA events, bf16 not needed: fp32).
phase latency "$BUDGET_LATENCY" "$out/latency.txt" \
  python3 -P bench/latency_check.py --device cuda --rows 65536 --batch 4096 --rounds 5 --repeats 10 \
  --json "$out/latency.json"
tail -16 "$out/latency.txt"

report() {
  python3 - "$out/selftest.json" <<'EOF'
import json, sys
try:
    data = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    print(f"selftest.json: not readable ({e})")
    sys.exit(0)
bad = [r for r in data["rows"] if not r["ok"]]
print(f"selftest: {len(data['rows'])} rows, {len(bad)} failing{'' if data['complete'] else ', run cut short'}")
for r in bad:
    print(f"  {r['status']}: {r['op']} {r['backend']} {r['shape']} {r['dtype']}: {r['failure']}")
EOF
  grep -E "^(FAILED|ERROR) " "$out/tests.log" | sed 's/^/  /' | head -40
}
export -f report
export out
t0=$SECONDS
timeout -k "$GRACE" "$BUDGET_REPORT" bash -c report >> "$summary" 2>&1
rc=$?
[ "$rc" = 0 ] || record report "$rc" $((SECONDS - t0)) "$BUDGET_REPORT"
if [ "$status" = 0 ]; then echo "gpu_check: PASS" >> "$summary"; else echo "gpu_check: FAIL" >> "$summary"; fi
echo
cat "$summary"
exit "$status"
