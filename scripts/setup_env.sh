#!/usr/bin/env bash
# Shared by scripts/test.sh and scripts/bench.sh (source it): a virtual environment in .venv (made
# if missing), the dependencies, and a build of fastcascade (CUDA kernels compiled when a toolkit is
# found and a GPU is visible; FASTCASCADE_FORCE_CUDA=1 compiles them without a GPU, or fails).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
. .venv/bin/activate
python -m pip install -q -r requirements-dev.txt
MAX_JOBS=${MAX_JOBS:-2} python -m pip install -q --no-build-isolation --no-deps .
(cd "$(mktemp -d)" && python -c "import fastcascade._ops as o; print('fastcascade built: CUDA kernels', o.CUDA_COMPILED, '| triton', o.HAS_TRITON)")
