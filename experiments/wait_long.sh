#!/usr/bin/env bash
# Wait for a run started by run_long.sh, printing its progress, for at most SECONDS; when it has ended,
# pack it for the trip back: OUT_DIR/<run name>.tar.gz (the trace, summary.json, router_bias.npz, the log).
#   bash experiments/wait_long.sh RUN_DIR SECONDS [OUT_DIR]
# Meant for the device's back-to-back commands (each at most 10 minutes; the machine goes back 30 s
# after a command ends): send the next wait at once. Exit code 0: the run ended and was packed (or there
# is nothing to pack: no OUT_DIR); 3: still running when SECONDS passed; 2: bad arguments.
set -uo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 RUN_DIR SECONDS [OUT_DIR]" >&2
  exit 2
fi
dir=${1%/}; limit=$2; out=${3:-}
if [ ! -f "$dir.pid" ]; then
  echo "$0: no $dir.pid (start the run with experiments/run_long.sh)" >&2
  exit 2
fi
pid=$(cat "$dir.pid")
start=$(date +%s); last=""
while kill -0 "$pid" 2>/dev/null; do
  line=$(grep -v '^W[0-9]' "$dir.log" 2>/dev/null | tail -1)
  if [ "$line" != "$last" ]; then echo "[$(( $(date +%s) - start )) s] $line"; last=$line; fi
  if [ $(( $(date +%s) - start )) -ge "$limit" ]; then
    echo "still running (pid $pid) after $limit s"
    exit 3
  fi
  sleep 5
done
echo "run ended; last lines of $dir.log:"
tail -5 "$dir.log"
if [ -n "$out" ]; then
  mkdir -p "$out"
  name=$(basename "$dir")
  tar -czf "$out/$name.tar.gz" -C "$(dirname "$dir")" "$name" "$name.log"
  ls -la "$out/$name.tar.gz"
fi
exit 0
