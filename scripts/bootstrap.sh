#!/usr/bin/env bash
# Create .venv and install moeload with the given extras, without ever replacing an installed torch.
#   scripts/bootstrap.sh [extras]      e.g. scripts/bootstrap.sh dev,deepspeed,hf
# torch: if the base interpreter already has torch (a CUDA build, say), the venv sees it through
# --system-site-packages and a constraints file pins exactly that version; otherwise it pins
# torch==2.13.0 (MOELOAD_TORCH overrides), whose CPU build lies on disk on our CI machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${1:-}
VENV=.venv
mkdir -p "$VENV"
if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
if "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  TORCH_PIN="torch==$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
else
  TORCH_PIN="torch==${MOELOAD_TORCH:-2.13.0}"
fi
echo "$TORCH_PIN" > "$VENV/constraints.txt"
export PIP_CONSTRAINT="$PWD/$VENV/constraints.txt" DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1
SPEC="."
[ -n "$EXTRAS" ] && SPEC=".[$EXTRAS]"
STAMP="$VENV/.installed-$(echo "$EXTRAS" | tr ',' '-')-$( (cat pyproject.toml; echo "$TORCH_PIN") | cksum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ]; then
  echo "bootstrap: installing moeload$([ -n "$EXTRAS" ] && echo "[$EXTRAS]") with $TORCH_PIN into $VENV"
  "$VENV/bin/python" -m pip install -q -e "$SPEC" 2> >(grep -v "^WARNING: Location" >&2) \
    || { echo "bootstrap: pip install -e '$SPEC' failed" >&2; exit 1; }
  touch "$STAMP"
fi
