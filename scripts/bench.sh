#!/usr/bin/env bash
# Benchmarks on the device at hand (GPU if visible, else CPU): fastcascade vs eager and torch.compile,
# after the environment and build of scripts/setup_env.sh. Extra arguments go to pytest.
set -euo pipefail
. "$(dirname "$0")/setup_env.sh"
pytest bench --benchmark-only --benchmark-columns=median,iqr,rounds --benchmark-sort=name "$@"
