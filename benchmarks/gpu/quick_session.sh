#!/usr/bin/env bash
# The short GPU measurements still owed, one after another inside ONE device command (at most 10 min),
# each under its own time limit, packed into one file for the trip back (the device returns at most 8):
#   hook host time per gate forward on CUDA (workload, generic top-k and DeepSpeed gates),
#   the cost of one re-placement on one GPU (two ranks over gloo, device tensors staged via the host),
#   where the traced step's extra time goes (benchmarks/step_profile.py: torch.profiler + cProfile, eager and compiled),
#   eager and compiled tracer overhead interleaved in one run (grouped experts, static shapes).
#
#   bash benchmarks/gpu/quick_session.sh "$OUT" [SECONDS]     -> $OUT/quick.tar.gz (logs + JSONs)
#   MOELOAD_DEVICE=cpu QUICK_SMALL=1 bash benchmarks/gpu/quick_session.sh /tmp/q 300   # plumbing check on CPU
#   QUICK_ONLY="step_profile step_profile_compiled overhead_both" bash benchmarks/gpu/quick_session.sh "$OUT" 500
#                                                                   # only the named steps
#
# DeepSpeed must be importable (on the lent machines: the wheel recipe of ../shared/gpu/README.md, then
# PYTHONPATH=/tmp/site:$PWD). A step that fails or runs out of time is logged ("rc N") and the next
# one still runs; steps that no longer fit are skipped and say so.
set -uo pipefail
out=${1:?usage: $0 OUT_DIR [SECONDS]}; budget=${2:-560}
dev=${MOELOAD_DEVICE:-cuda}; py=${PYTHON:-python3}
mkdir -p "$out"; work=$(mktemp -d); start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
step() {  # step NAME MIN_SECONDS CMD...: run CMD with what is left minus a margin, log to work/NAME.log
  local name=$1 need=$2 l; shift 2; l=$(left)
  if [ -n "${QUICK_ONLY:-}" ] && [[ " $QUICK_ONLY " != *" $name "* ]]; then echo "== $name: not in QUICK_ONLY"; return; fi
  if [ "$l" -lt "$need" ]; then echo "== $name: skipped, $l s left (needs $need)" | tee "$work/$name.log"; return; fi
  echo "== $name ($l s left)"
  timeout -s TERM $(( l - 15 )) "$@" > "$work/$name.log" 2>&1; echo "rc $?" >> "$work/$name.log"
  tail -4 "$work/$name.log"
}
if [ -n "${QUICK_SMALL:-}" ]; then  # seconds-long versions of every step (plumbing only, numbers meaningless)
  hook=(--calls 200 --repeats 2); rc=(--tiny); ov=(--config cpu-demo --steps 8 --block 2 --warmup 1 --backend aot_eager)
  sp=(--steps 3 --profile-steps 2)
else
  hook=(--repeats 8); rc=(); ov=(--steps 400 --block 4 --warmup 10); sp=(--steps 40 --profile-steps 10)
fi
cfg=$([ "$dev" = cuda ] && echo gpt3-small-moe || echo cpu-demo)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$work/gpu.txt" 2>&1 || true
$py -c "import torch, sys; print(sys.version); print('torch', torch.__version__)" >> "$work/gpu.txt" 2>&1
step hook_workload 40 $py benchmarks/hook_host_time.py --device "$dev" --config "$cfg" "${hook[@]}"
step hook_generic 40 $py benchmarks/hook_host_time.py --device "$dev" --config "$cfg" --gate generic "${hook[@]}"
step hook_deepspeed 40 $py benchmarks/hook_host_time.py --device "$dev" --gate deepspeed "${hook[@]}"
step replace_cost 60 $py -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/replace_cost.py \
  --device "$dev" --backend gloo --grads random "${rc[@]}" --out "$work/replace_cost_1gpu_gloo.json"
step step_profile 60 $py benchmarks/step_profile.py --device "$dev" --config "$cfg" "${sp[@]}" --out "$work/step_profile"
step step_profile_compiled 90 $py benchmarks/step_profile.py --device "$dev" --config "$cfg" "${sp[@]}" --compile \
  $([ "$dev" = cuda ] || echo --backend aot_eager) --out "$work/step_profile"
dl=$(( $(left) - 60 )); [ "$dl" -lt 30 ] && dl=30
step overhead_both 120 $py benchmarks/tracer_overhead.py --device "$dev" --mode both "${ov[@]}" \
  --deadline-s "$dl" --out "$work/overhead_both"
tar czf "$out/quick.tar.gz" -C "$work" . && echo "packed $(ls "$work" | wc -l) files into $out/quick.tar.gz after $(( $(date +%s) - start )) s"
