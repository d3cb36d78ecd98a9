#!/usr/bin/env bash
# Single-node launch: launch/torchrun.sh CONFIG [a.b=c ...]
# NPROC processes (default: number of GPUs, else 2); CPU/gloo or CUDA/NCCL is picked by sift itself.
# The config is validated once before any rank starts, so a bad config is one line, not N tracebacks.
set -euo pipefail
if [ $# -lt 1 ]; then echo "usage: launch/torchrun.sh CONFIG [a.b=c ...]" >&2; exit 2; fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}"
if [ -z "${NPROC:-}" ]; then
  NPROC="$("$PY" -c 'import torch; print(torch.cuda.device_count() or 2)')"
fi
CORES="$(nproc)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))}"
export PYTHONUNBUFFERED=1
RUN_DIR="$("$PY" -m sift_megatron.cli check "$@" --world-size "$NPROC" --print-out-dir)"
mkdir -p "$RUN_DIR"
PORT="${MASTER_PORT:-$(( 29500 + RANDOM % 2000 ))}"
echo "[torchrun.sh] $NPROC processes, OMP_NUM_THREADS=$OMP_NUM_THREADS, log: $RUN_DIR/launch.log" >&2
"$PY" -m torch.distributed.run --nproc_per_node="$NPROC" --master_addr=127.0.0.1 --master_port="$PORT" \
  -m sift_megatron.cli train "$@" 2>&1 | tee -a "$RUN_DIR/launch.log"
exit "${PIPESTATUS[0]}"
