#!/usr/bin/env bash
# The main job, from a fresh clone: .venv -> train on every GPU (or the CPU) -> export with the parity
# gate -> verify -> predict the sample digits. Arguments go to the trainer, e.g.
#   launch/run.sh --task binary --epochs 3 --data-dir data --run-dir runs/binary
# Env: NPROC (processes; default every GPU, else up to 4 CPU ranks), MAX_RESTARTS (default 0).
# Rerunning is cheap: training resumes from RUN_DIR/checkpoints/last.pt, the export is replaced.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"

# The run dir the trainer will use, from the trainer's own flag parsing (a usage error stops here, with its message)
run_dir=$(python -c 'import sys; from distributed.config import parse_args; print(parse_args(sys.argv[1:]).run_dir)' "$@")
nproc="${NPROC:-$(default_nproc)}"

step() { echo "==> $*" >&2; }
fail() { echo "run.sh: $1 failed (exit $2): see the error above; rerun after fixing it" >&2; exit "$2"; }

step "train: torchrun with $nproc process(es), run dir $run_dir"
torchrun --standalone --nproc-per-node="$nproc" --max-restarts="${MAX_RESTARTS:-0}" \
  -m distributed.train "$@" || fail "training" $?
step "export: $run_dir/checkpoints/best.pt -> $run_dir/export"
python -m export --run-dir "$run_dir" || fail "export" $?
step "verify: $run_dir/export"
python -m export --verify "$run_dir/export" || fail "verify" $?
step "predict: launch/samples"
serve_cli predict launch/samples --model "$run_dir/export" || fail "predict" $?
step "done: tensorboard --logdir $run_dir ; serve_cli predict YOUR_IMAGES/ --model $run_dir/export"
