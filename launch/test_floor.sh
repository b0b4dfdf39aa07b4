#!/usr/bin/env bash
# The oldest torch this project claims (pyproject.toml's torch>= floor; the device check's GPU machine has it),
# in a venv of its own: the tests that use the most torch API (training, resume, DDP over gloo, every export
# path) must pass with it too. CI runs it after launch/test.sh. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
torch=$(sed -n 's/.*"torch>=\([0-9.]*\)".*/\1/p' pyproject.toml)
vision=$(sed -n 's/.*"torchvision>=\([0-9.]*\)".*/\1/p' pyproject.toml)
VENV="${FLOOR_VENV:-$ROOT/.venv-floor}"
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [[ ! -f "$stamp" ]]; then
  echo "setting up $VENV with torch $torch (the floor; a few minutes)" >&2
  [[ -x "$VENV/bin/python" ]] || "${PYTHON:-python3}" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==$torch.*" "torchvision==$vision.*" -e "$ROOT[dev]"
  rm -f "$VENV"/.installed-* && touch "$stamp"
fi
"$VENV/bin/python" -c 'import torch; print(f"floor: torch {torch.__version__}")'
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_train.py tests/test_export.py tests/test_torchrun.py tests/test_step_metrics.py "$@"
