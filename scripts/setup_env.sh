#!/usr/bin/env bash
# Shared by scripts/test.sh, scripts/bench.sh and scripts/demo.sh (source it): a virtual environment in
# .venv (made if missing), the dependencies (FASTCASCADE_REQUIREMENTS, default requirements-dev.txt), and
# a build of fastcascade (CUDA kernels compiled when a toolkit is found and a GPU is visible;
# FASTCASCADE_FORCE_CUDA=1 compiles them without a GPU, or fails).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
. .venv/bin/activate
requirements=${FASTCASCADE_REQUIREMENTS:-requirements-dev.txt}
# The CPU demo's file, a venv without torch and no GPU visible: torch's CPU-only build first (where pip can
# find one, ~180 MB unpacked to 1 GB, against 5 GB with the CUDA libraries that nothing here could use).
# FASTCASCADE_CPU_TORCH names the requirement; the file then keeps the torch it finds.
if [ "$requirements" = requirements.txt ] && ! python -c "import torch" 2>/dev/null \
        && ! nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q "${FASTCASCADE_CPU_TORCH:-torch==2.13.0}"
fi
python -m pip install -q -r "$requirements"
MAX_JOBS=${MAX_JOBS:-2} python -m pip install -q --no-build-isolation --no-deps .
(cd "$(mktemp -d)" && python -c "import fastcascade._ops as o; print('fastcascade built: CUDA kernels', o.CUDA_COMPILED, '| triton', o.HAS_TRITON)")
