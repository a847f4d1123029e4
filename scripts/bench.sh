#!/usr/bin/env bash
# Benchmarks on the device at hand (GPU if visible, else CPU): fastcascade vs eager and torch.compile.
# Assumes scripts/test.sh (or an install) has run. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && . .venv/bin/activate
pytest bench --benchmark-only --benchmark-columns=median,iqr,rounds --benchmark-sort=name "$@"
