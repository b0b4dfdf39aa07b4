#!/usr/bin/env bash
# Fresh clone -> .venv -> pytest. Extra arguments go to pytest (e.g. launch/test.sh -m "not slow").
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
exec python -m pytest "$@"
