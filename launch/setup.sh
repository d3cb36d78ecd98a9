#!/usr/bin/env bash
# Create ./.venv and install sift-megatron with every extra at the verified versions of launch/constraints.txt
# (idempotent: re-installs only when pyproject.toml or the constraints changed). Sourced by launch/quickstart.sh
# and launch/test.sh. Into an environment that already has (CUDA) torch, DeepSpeed...: see README, "Installing".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SIFT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.sift-installed"
CONSTRAINTS="$ROOT/launch/constraints.txt"
HASH="$(cat "$ROOT/pyproject.toml" "$CONSTRAINTS" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HASH" ]; then
  echo "[setup] installing sift-megatron and its verified dependencies into $VENV" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  # torch first, alone, at the verified version (the CPU wheel where one is on disk): a later resolve then keeps it.
  "$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" torch >&2
  "$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" -e "$ROOT[all,dev]" >&2
  echo "$HASH" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export PYTHONUNBUFFERED=1
