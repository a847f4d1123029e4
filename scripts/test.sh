#!/usr/bin/env bash
# The test command: environment and build (scripts/setup_env.sh), then pytest. Extra arguments go to pytest.
set -euo pipefail
. "$(dirname "$0")/setup_env.sh"
# `pytest` (not `python -m pytest`): the source tree stays off sys.path, so tests import the installed build.
pytest tests "$@"
