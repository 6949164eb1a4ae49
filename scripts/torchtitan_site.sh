#!/usr/bin/env bash
# Install torchtitan 0.3.0 and triton, pinned and --no-deps, into .venv/torchtitan-site (a --target
# directory, used through PYTHONPATH by `make test` for tests/tracing/test_torchtitan.py only).
# Why apart from .venv: torchtitan's declared dependencies pull wandb and datasets<4.8, which pins
# huggingface_hub<2 and so downgrades transformers; its MoE module imports triton, which it does not
# declare. With --no-deps neither reaches the venv, and torch stays the one bootstrap pinned.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
SITE="$VENV/torchtitan-site"
PKGS="torchtitan==0.3.0 spmd_types==0.2.3 tyro==1.0.17 docstring_parser==0.18.0 typeguard==4.6.1 triton==3.9.0"
STAMP="$SITE/.installed-$(echo "$PKGS" | cksum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ]; then
  echo "torchtitan_site: installing $PKGS into $SITE (--no-deps)"
  rm -rf "$SITE"
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install -q --no-deps --target "$SITE" $PKGS \
    2> >(grep -v "^WARNING: Location" >&2) || { echo "torchtitan_site: pip install failed" >&2; exit 1; }
  touch "$STAMP"
fi
