#!/usr/bin/env bash
# Make .venv and install the project into it, once per pyproject.toml change. Sourced by the other
# launch scripts; run it alone once before starting several nodes on a shared filesystem.
# SKIP_SETUP=1 uses whatever python/torchrun are already on PATH (containers, tests).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ "${SKIP_SETUP:-0}" != 1 ]]; then
  VENV="${VENV:-$ROOT/.venv}"
  PYTHON="${PYTHON:-python3}"
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "error: Python 3.10+ is needed ($PYTHON is $("$PYTHON" -V 2>&1)); set PYTHON=/path/to/python3.x" >&2; exit 1; }
  stamp="$VENV/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
  if [[ ! -f "$stamp" ]]; then
    echo "setting up $VENV (first run: downloads torch, a few minutes)" >&2
    [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"
    rm -f "$VENV"/.installed-* && touch "$stamp"
  fi
  export PATH="$VENV/bin:$PATH"
fi

# Processes per node: every GPU, else a few CPU ranks (the trainer splits the cores between them).
default_nproc() {
  local gpus
  gpus=$(python -c 'import torch; print(torch.cuda.device_count())')
  if (( gpus > 0 )); then echo "$gpus"; else local c; c=$(nproc); echo $(( c < 4 ? c : 4 )); fi
}
