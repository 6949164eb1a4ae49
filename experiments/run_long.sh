#!/usr/bin/env bash
# Start experiments/train_long.py detached (setsid + nohup): it survives the launching shell and
# the end of the command that started it, and keeps streaming its trace into RUN_DIR.
#   bash experiments/run_long.sh RUN_DIR [train_long.py args...]
#   bash experiments/run_long.sh runs/small-aux-s0 --config small --balance aux --seed 0 --steps 10000
# Writes RUN_DIR.log (stdout + stderr) and RUN_DIR.pid next to RUN_DIR (the trainer creates
# RUN_DIR itself and refuses an existing one). Poll with:  tail -3 RUN_DIR.log
# Stop with:  kill $(cat RUN_DIR.pid)   (SIGTERM: the trace is flushed and summary.json written)
# On CUDA the trainer compiles its blocks by default (about a minute before the first step; --no-compile
# runs eager). Measure first: train_long.py --config small --bench 90 --out /tmp/b (see its docstring).
# PYTHON selects the interpreter (default: .venv/bin/python if present, else python3, as on the
# GPU image); the checkout's root goes first on PYTHONPATH.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 RUN_DIR [train_long.py args...]" >&2
  exit 2
fi
dir=${1%/}; shift
if [ -e "$dir" ] || [ -e "$dir.log" ]; then
  echo "$0: $dir or $dir.log already exists; pick another RUN_DIR" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
py=${PYTHON:-$([ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || echo python3)}
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1  # moeload from this checkout
mkdir -p "$(dirname "$dir")"
setsid nohup "$py" -u "$here/train_long.py" --out "$dir" "$@" > "$dir.log" 2>&1 < /dev/null &
echo $! > "$dir.pid"
echo "started pid $(cat "$dir.pid"): log $dir.log, trace $dir/trace.moeload"
