#!/usr/bin/env bash
# The main job: environment and build (scripts/setup_env.sh), then `python -m fastcascade demo`, which
# trains and evaluates the AV1 partition cascade on the embedded dataset. Extra arguments go to the demo
# (--quick, --device cuda, --epochs N, --out DIR, ...; see --help); relative paths are from where you call it.
set -euo pipefail
here=$PWD
# Without a visible GPU the demo needs only requirements.txt (no Triton, timm or CUDA libraries), and a
# venv without torch gets torch's CPU-only build (where pip can find one: ~180 MB, unpacked to 1 GB,
# against 5 GB with the CUDA libraries that nothing here could use); a venv that holds torch keeps it.
if [ -z "${FASTCASCADE_REQUIREMENTS:-}" ] && ! nvidia-smi -L >/dev/null 2>&1; then
    export FASTCASCADE_REQUIREMENTS=requirements.txt
    export FASTCASCADE_CPU_TORCH=${FASTCASCADE_CPU_TORCH:-torch==2.13.0}
fi
. "$(dirname "$0")/setup_env.sh"
cd "$here"
# Import the installed build (with fastcascade._C), not ./fastcascade when called from the source tree:
# drop the current directory from sys.path (python -P / PYTHONSAFEPATH need Python >= 3.11).
python -c 'import runpy, sys; sys.path.pop(0); runpy.run_module("fastcascade", run_name="__main__", alter_sys=True)' \
    demo "$@"
