#!/usr/bin/env bash
# (Kept in sync with the workplace copy in ../shared/gpu.) Build an offline bundle for a GPU machine that has Python 3.12 with a CUDA torch (and transformers,
# safetensors, sentencepiece, scipy, tensorboard...) but no package index: wheels of what such an image
# lacks, at the versions of this checkout's .venv. Run from the project root after `bash launch/setup.sh`
# (or any command that made .venv). Output: .gpu-bundle/whl/ (kept out of git via .git/info/exclude).
# On the GPU machine, from the project root: bash ../shared/gpu/run.sh CMD...  (or .gpu-bundle/run.sh CMD...)
set -euo pipefail
ROOT=$(pwd); VENV=${SIFT_VENV:-$ROOT/.venv}; PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "prepare.sh: no $VENV; run 'bash launch/setup.sh' first" >&2; exit 1; }
OUT=$ROOT/.gpu-bundle; rm -rf "$OUT"; mkdir -p "$OUT/whl"
EXC=$(git rev-parse --git-common-dir)/info/exclude; mkdir -p "$(dirname "$EXC")"
grep -qx '/.gpu-bundle/' "$EXC" 2>/dev/null || echo '/.gpu-bundle/' >> "$EXC"
ver() { "$PY" -c "import importlib.metadata as m,sys; print(m.version(sys.argv[1]))" "$1"; }
PLAT=""; for p in manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35 manylinux2014 manylinux1; do PLAT="$PLAT --platform ${p}_x86_64"; done
# Missing from the GPU image (add names here when a GPU run reports ModuleNotFoundError).
for pkg in megatron-core pydantic pydantic-core annotated-types typing-inspection hjson datasets dill multiprocess; do
  v=$(ver "$pkg" 2>/dev/null) || { echo "prepare.sh: $pkg not in .venv, skipped" >&2; continue; }
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT -d "$OUT/whl" "$pkg==$v" 2>&1 | grep -v '^WARNING' >&2 || true
done
# DeepSpeed ships only as a source archive: build its pure-Python wheel here (no CUDA ops are compiled).
DSV=$(ver deepspeed); TMP=$(mktemp -d)
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$TMP" "deepspeed==$DSV" 2>&1 | grep -v '^WARNING' >&2 || true
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT/whl" "$TMP"/deepspeed-*.tar.gz 2>&1 | grep -v '^WARNING' >&2 || true
rm -rf "$TMP"
cp "$(dirname "$0")/run.sh" "$OUT/run.sh"; cp "$(dirname "$0")/check.sh" "$OUT/check.sh"
ls "$OUT/whl"; du -sh "$OUT"
