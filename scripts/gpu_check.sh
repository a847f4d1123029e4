#!/usr/bin/env bash
# One call on a lent GPU machine (no package registry there): build against its torch, run the
# whole test suite (GPU tests included) and the benchmarks, and leave logs and JSON under $OUT.
#   run: bash scripts/gpu_check.sh   (OUT defaults to ./gpu-out; -P keeps the source tree off sys.path)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
FASTCASCADE_FORCE_CUDA=1 python3 -m pip install --no-build-isolation --no-deps . > "$out/build.log" 2>&1 \
  || { tail -50 "$out/build.log"; exit 1; }
python3 -P -m pytest tests -q -p no:cacheprovider 2>&1 | tee "$out/tests.log" | tail -25
python3 -P -m pytest bench --benchmark-only -q -p no:cacheprovider --benchmark-json="$out/bench.json" \
  --benchmark-columns=median --benchmark-sort=name > "$out/bench.log" 2>&1
python3 bench/report.py "$out/bench.json" | tee "$out/bench_table.md"
