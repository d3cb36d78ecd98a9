#!/usr/bin/env bash
# Set up (if needed) and run the main job: `sift quickstart` (see README).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup.sh"
cd "$ROOT"
exec sift quickstart "$@"
