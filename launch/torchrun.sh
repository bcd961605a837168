#!/usr/bin/env bash
# Launch mmtrain with torchrun on this node (or one node of a multi-node job).
#
#   launch/torchrun.sh [hydra overrides...]
#
# Environment (all optional): NPROC (processes on this node; default: GPUs, else 1),
# NNODES (default 1), NODE_RANK (default 0), MASTER_ADDR (default 127.0.0.1),
# MASTER_PORT (default 29500), MMTRAIN_PYTHON (default: python3 on PATH).
set -euo pipefail
PY=${MMTRAIN_PYTHON:-python3}
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$("$PY" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
NNODES=${NNODES:-1}
if [[ "$NNODES" == 1 ]]; then
  exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m mmtrain.train "$@"
fi
exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --node-rank "${NODE_RANK:-0}" \
  --nproc-per-node "$NPROC" --rdzv-backend c10d \
  --rdzv-endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" \
  --rdzv-id "${RDZV_ID:-mmtrain}" -m mmtrain.train "$@"
