#!/usr/bin/env bash
# The GPU suite and benchmark in one command, on a machine whose Python already has a CUDA torch (an NGC /
# PyTorch container, a cloud image): that torch is never replaced. Run from the project root:
#   bash launch/gpu/check.sh            # tests/gpu, then benchmarks/gpu_throughput.py (one JSON line)
# tests/gpu includes the block-sparse Triton kernels (sparsity.kernel=block) against masked dense; the benchmark
# reports sw75_block_over_dense beside sw75_block_masked_over_dense. Triton is the one the image's torch pins.
# What the image lacks (megatron-core, DeepSpeed, ...) comes from .gpu-bundle/whl when present, into ./.gpu-site
# beside the image's packages (offline: `bash launch/gpu/bundle.sh` on a networked machine with ./.venv made it),
# else from the package index into the image's environment with its installed torch pinned as a constraint.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "gpu/check.sh: $PY has no CUDA torch (or sees no GPU); nothing to run" >&2; exit 1; }
SITE="$ROOT/.gpu-site"
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$PY" -c "import megatron.core, deepspeed" 2>/dev/null; then
  mkdir -p "$SITE"
  if compgen -G ".gpu-bundle/whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .gpu-bundle/whl/*.whl
  else
    # Into the image's environment; the constraint keeps its torch (pip sees it satisfied and leaves it).
    CON="$(mktemp)"; "$PY" -c "import torch; print('torch==' + torch.__version__)" > "$CON"
    "$PY" -m pip install -q -c "$CON" "megatron-core==0.16.1" "deepspeed==0.19.8"
    rm -f "$CON"
  fi
fi
"$PY" -c "import torch, megatron.core, deepspeed; print('gpu/check.sh: torch', torch.__version__, torch.cuda.get_device_name(0), '| megatron-core', megatron.core.__version__, '| deepspeed', deepspeed.__version__)"
"$PY" -c "import importlib.util as u; print('gpu/check.sh: triton', __import__('triton').__version__ if u.find_spec('triton') else 'missing (sparsity.kernel=block falls back to the torch reference)')"
"$PY" -m pytest -q tests/gpu
exec "$PY" benchmarks/gpu_throughput.py "$@"
