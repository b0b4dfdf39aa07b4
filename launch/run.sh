#!/usr/bin/env bash
# Fresh clone -> .venv -> training on every GPU of this machine (or the CPU).
# Arguments go to the trainer: launch/run.sh --task binary --epochs 3 --data-dir data
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
gpus=$(python -c 'import torch; print(torch.cuda.device_count())')
if (( gpus > 0 )); then
  nproc=$gpus
else  # CPU: a few gloo ranks, the cores split between them by the trainer
  cores=$(nproc)
  nproc=$(( cores < 4 ? cores : 4 ))
fi
echo "training with $nproc process(es) ($([[ $gpus -gt 0 ]] && echo "$gpus GPU(s)" || echo CPU))" >&2
exec torchrun --standalone --nproc_per_node="$nproc" -m distributed.train "$@"
