#!/usr/bin/env bash
# One torchrun agent per node, joined by torchrun's c10d rendezvous. Run the same command on every node:
#   NNODES=2 RDZV_ENDPOINT=node0:29500 launch/multinode.sh --run-dir /shared/runs/digits --data-dir /shared/data
# NNODES may be MIN:MAX (elastic: nodes may join or leave; the job restarts from the last checkpoint).
# Env: NNODES (required), RDZV_ENDPOINT=host:port (or MASTER_ADDR[/MASTER_PORT]), RDZV_ID (same on all
# nodes), NPROC_PER_NODE (default every GPU, else up to 4 CPU ranks), MAX_RESTARTS (default 3), RDZV_CONF
# (torchrun's --rdzv-conf, e.g. last_call_timeout=5: how long a rendezvous that has NNODES' minimum waits
# for more nodes, 30 s by default).
# --run-dir must be on a filesystem every node sees: global rank 0 writes checkpoints there and every
# restarted worker resumes from them. MNIST is prepared once per node (local rank 0) in --data-dir.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
: "${NNODES:?set NNODES, e.g. NNODES=2 (or 1:4 for elastic)}"
endpoint="${RDZV_ENDPOINT:-${MASTER_ADDR:?set RDZV_ENDPOINT=host:port or MASTER_ADDR}:${MASTER_PORT:-29500}}"
exec torchrun --nnodes="$NNODES" --nproc-per-node="${NPROC_PER_NODE:-$(default_nproc)}" \
  --rdzv-backend=c10d --rdzv-endpoint="$endpoint" --rdzv-id="${RDZV_ID:-mnist-ddp}" \
  ${RDZV_CONF:+--rdzv-conf="$RDZV_CONF"} --max-restarts="${MAX_RESTARTS:-3}" -m distributed.train "$@"
