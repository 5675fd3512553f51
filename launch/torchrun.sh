#!/usr/bin/env bash
# Start moesaic under torchrun, filling in what it can from the environment.
#   single node:  launch/torchrun.sh [hydra overrides...]
#   multi-node:   NNODES=2 MASTER_ADDR=host0 MASTER_PORT=29500 launch/torchrun.sh [overrides...]  (on every node)
# NPROC_PER_NODE defaults to the GPU count, or 4 CPU ranks when there is no GPU.
set -euo pipefail
PY=${PYTHON:-python3}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$("$PY" -c 'import torch; print(torch.cuda.device_count() or 4)')
fi
NNODES=${NNODES:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# torchrun (>= 2.9: its --signals-to-handle) passes these on to its workers, which stop after their
# step with a checkpoint (checkpoint.on_signal); a SIGUSR1 would otherwise end torchrun itself at once
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
if [ "$NNODES" = 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC_PER_NODE" -m moesaic.trainer "$@"
fi
: "${MASTER_ADDR:?MASTER_ADDR must be set for a multi-node launch}"
MASTER_PORT=${MASTER_PORT:-29500}
exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "${RDZV_ID:-moesaic}" \
  -m moesaic.trainer "$@"
