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
# FASTCASCADE_CPU_TORCH (scripts/demo.sh sets it without a GPU): the torch a venv without one gets first;
# the requirements then keep the torch they find.
if [ -n "${FASTCASCADE_CPU_TORCH:-}" ] \
        && ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"; then
    python -m pip install -q "$FASTCASCADE_CPU_TORCH"
fi
python -m pip install -q -r "${FASTCASCADE_REQUIREMENTS:-requirements-dev.txt}"
MAX_JOBS=${MAX_JOBS:-2} python -m pip install -q --no-build-isolation --no-deps .
(cd "$(mktemp -d)" && python -c "import fastcascade._ops as o; print('fastcascade built: CUDA kernels', o.CUDA_COMPILED, '| triton', o.HAS_TRITON)")
