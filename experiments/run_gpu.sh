#!/usr/bin/env bash
# Run one experiment setup, two seeds at once on a 4-GPU machine (seed 0 on GPUs 0-1, seed 1 on
# GPUs 2-3; DeepSpeed ep_size = 2 = GPUs of each run), then pack the traces for the trip back.
#   bash experiments/run_gpu.sh gpt3-small-moe 390 "$OUT"
# (on the lent GPU machines: install the deepspeed wheel first, see ../shared/gpu/README.md)
set -uo pipefail
name=$1; budget=${2:-390}; out=${3:-runs}
mkdir -p "$out" runs
pids=()
for seed in 0 1; do
  gpus=$([ "$seed" = 0 ] && echo 0,1 || echo 2,3)
  rm -rf "runs/$name-s$seed.moeload" "runs/$name-s$seed.moeload.json"  # never append to an earlier attempt
  CUDA_VISIBLE_DEVICES=$gpus torchrun --nproc_per_node 2 --master_port $((29500 + seed)) \
    experiments/train_ds.py --config "experiments/$name/config.json" --seed "$seed" \
    --out "runs/$name-s$seed.moeload" --time-budget "$budget" --overhead-blocks ${OVERHEAD_BLOCKS:-4} \
    > "$out/$name-s$seed.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
for seed in 0 1; do
  tail -5 "$out/$name-s$seed.log"
  [ -d "runs/$name-s$seed.moeload" ] && tar czf "$out/$name-s$seed.tar.gz" -C runs "$name-s$seed.moeload" "$name-s$seed.moeload.json"
done
ls -la "$out"
exit $rc
