#!/usr/bin/env bash
# The README's TensorBoard screenshots: the default one-epoch run and a 3-epoch run side by side (2 ranks
# each), every tab opened in headless Chromium as a person would open it, no clicks.
#   docs/img/screenshots.sh DATA_DIR [WORK_DIR]     # needs chromium (Debian: apt install chromium)
# The PNGs go to WORK_DIR/png (default: a temporary folder); copy the ones the README shows into docs/img/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DATA="${1:?usage: docs/img/screenshots.sh DATA_DIR [WORK_DIR]}"
WORK="${2:-$(mktemp -d)}"
source "$ROOT/launch/setup.sh"
cd "$ROOT"
train() {  # run dir, flags...
  local dir="$WORK/runs/$1"; shift
  [[ -f "$dir/metrics.json" ]] || torchrun --standalone --nproc_per_node=2 -m distributed.train --data-dir "$DATA" \
    --run-dir "$dir" --no-resume "$@"
}
train digits-1epoch
train digits-3epochs --epochs 3 --val-size 5000
PORT="${PORT:-6123}"
"$(command -v tensorboard)" --logdir "$WORK/runs" --host 127.0.0.1 --port "$PORT" >"$WORK/tensorboard.log" 2>&1 &
tb=$!
trap 'kill "$tb" 2>/dev/null || true' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$PORT/" >/dev/null && break; sleep 1; done
mkdir -p "$WORK/png"
shot() {  # name, url
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1500,1100 \
    --virtual-time-budget=25000 --screenshot="$WORK/png/$1.png" "$2" >/dev/null 2>&1
  echo "$WORK/png/$1.png"
}
base="http://127.0.0.1:$PORT"
# The Scalars tab, not Time Series: Time Series draws with WebGL, which headless Chromium leaves blank here.
shot tb_scalars "$base/#scalars&tagFilter=test%2F%7Cval%2F&_smoothingWeight=0"
shot tb_perf "$base/#scalars&tagFilter=perf%2Fstep%7Ctrain%2F&_smoothingWeight=0"
shot tb_images "$base/#images"
shot tb_text "$base/#text"
shot tb_per_class "$base/#custom_scalars"
shot tb_pr_curves "$base/#pr_curves"
shot tb_projector "$base/#projector"
shot tb_hparams "$base/#hparams"
shot tb_graphs "$base/#graphs"
