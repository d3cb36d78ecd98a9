#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, slow multi-process tests included.
# Extra arguments go to pytest, e.g. `bash launch/test.sh -m "not slow"` for the fast unit tests only.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup.sh"
cd "$ROOT"
exec python -m pytest -q "$@"
