#!/bin/bash
# The GPU check: what has to hold on CUDA, in one run of at most 8 minutes on one GPU. Run it whenever a GPU
# machine is at hand and copy its summary into benchmarks/README.md with the date and the device.
#
#   bash benchmarks/gpu_check.sh [--parts "1 2 3 4 5 6"] [OUT_DIR]         # on a GPU machine
#   bash benchmarks/gpu_check.sh --cpu [--parts ...] [OUT_DIR]             # the same at toy sizes on the CPU (a dry run)
#
# 1. the quickstart on CUDA (2 rounds, one process: every server on the GPU);
# 2. the quickstart with NF4 bases through bitsandbytes (quant.backend=bitsandbytes) on CUDA;
# 3. benchmarks/step_vs_peft.py: the engine's step vs peft on the 34M/29M models, then on a random-init Llama of
#    about 1.1B parameters (fp32), then that model's NF4 base: the engine's vs peft + bitsandbytes QLoRA;
#    tokens/s, GFLOP/s against the measured matmul peak, peak memory; first the operators and CUDA kernels each
#    step launches, engine and peft (step_vs_peft.py --ops: what a launch-bound step's time follows);
# 4. benchmarks/scale_7b.py --micro-only: one LLaMA-2-7B layer's merge, its fidelity check and the importance
#    measurement, timed on the device (what scale_7b.py's A100 column estimates from the CPU);
# 5. the cost model's memory prediction for the quickstart plans, next to the measured peak;
# 6. issue 27's GPU clock: benchmarks/time_to_quality.py on p4 and s4 with every server on this GPU and the
#    measured clock (clients.throttle=clock: each server's synchronized step seconds x its slowdown), rows LoRA,
#    lora_hb, the kept adapter with t0 given and FedPipe's GPU default (plan.step_cost=measured, which fits
#    t(b) = t0 + c x tokens on this device, and lora.rebalance=orth);
#    needs FEDPIPE_SHARED_DATA (stories260K-hf and E2E); stopped after GPU_CHECK_CLOCK_S seconds (default 330;
#    seed by seed, p4 then s4, every finished (seed, profile) is in its JSON). On an H200 one seed of p4 takes
#    about 200 s: GPU_CHECK_CLOCK="--profiles s4 --seeds 0" picks what one call measures;
# 7. every method, the centralized limit and the switches that keep state across rounds (lora.carry=shared_a,
#    kept AdamW moments, a server optimizer, the dense transport, the bf16 wire, plan.step_cost=measured):
#    2 rounds of the quickstart each on the device, side by side; one line each, ok or the error.
# Parts run in the order given. A part whose package is missing (bitsandbytes for 2 and the QLoRA line of 3) or
# whose data is absent (6) is skipped with the reason. Each part's JSON and log go to OUT_DIR (default
# benchmarks/out/gpu_check); the summary to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
cpu=0
parts="1 2 3 4 5 6 7"
while [[ $# -gt 0 ]]; do
  case $1 in
    --cpu) cpu=1; shift ;;
    --parts) parts=$2; shift 2 ;;
    *) break ;;
  esac
done
out=${1:-benchmarks/out/gpu_check}
mkdir -p "$out"
py=${FEDPIPE_PYTHON:-}
if [[ -z $py ]]; then
  if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
small=(rounds=2 train.local_steps=4 data.synthetic_train_size=128 data.synthetic_eval_size=32 eval.max_samples=32
       clients.slowdown=1 output.overwrite=true)
bnb=1
if [[ $cpu == 1 ]]; then
  device=cpu
  export CUDA_VISIBLE_DEVICES=  # the CPU even on a GPU machine
  nf4=(quant.backend=native)  # bitsandbytes' NF4 kernels are CUDA's; the native NF4 is byte-identical
  steps=(--steps 2 --repeats 1 --only llama-34M)
  big=()
  hidden=2048
  clock=(--profiles p4 --seeds 0 --target-rounds 2 --train-samples 200 --eval-samples 16 --local-steps 2)
else
  device=cuda
  "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "gpu_check: no CUDA device (use --cpu for the dry run)")'
  "$py" -c 'import bitsandbytes' 2> /dev/null || bnb=0
  nf4=(quant.backend=bitsandbytes)
  steps=(--steps 8 --repeats 3)
  big=(--big --steps 4 --repeats 2)
  hidden=4096
  read -r -a clock <<< "${GPU_CHECK_CLOCK:---profiles p4 s4 --seeds 0 1 2}"
fi
no_bnb="skipped: bitsandbytes is not installed in $py (pip install bitsandbytes)"
t0=$SECONDS

part1() {
  echo "== 1. quickstart on $device" >&2
  "$py" -m fedpipe_dist run jobs/quickstart.yaml "${small[@]}" \
    "output.dir=$out/quickstart" --no-progress 2> "$out/quickstart.log"
  tail -n 1 "$out/quickstart.log"
}

part2() {
  echo "== 2. NF4 bases ($device, ${nf4[*]})" >&2
  if [[ $bnb == 0 ]]; then echo "nf4: $no_bnb"; return; fi
  "$py" -m fedpipe_dist run jobs/quickstart.yaml "${small[@]}" clients.precision=nf4 "${nf4[@]}" \
    "output.dir=$out/nf4" --no-progress 2> "$out/nf4.log"
  tail -n 1 "$out/nf4.log"
}

part3() {
  echo "== 3. step vs peft ($device)" >&2
  "$py" benchmarks/step_vs_peft.py --device "$device" --ops --only llama-34M gpt2-29M --out "$out/step_ops.json" \
    > /dev/null
  "$py" benchmarks/step_vs_peft.py --device "$device" "${steps[@]}" --out "$out/step_vs_peft.json"
  if [[ ${#big[@]} -gt 0 ]]; then
    "$py" benchmarks/step_vs_peft.py --device "$device" "${big[@]}" --out "$out/step_vs_peft_1b.json"
    if [[ $bnb == 0 ]]; then echo "step_vs_peft 1.1B QLoRA: $no_bnb"; return; fi
    "$py" benchmarks/step_vs_peft.py --device "$device" "${big[@]}" --qlora --out "$out/step_vs_peft_1b_qlora.json"
  fi
}

part4() {
  echo "== 4. one 7B-wide layer's merge, fidelity check and importance ($device)" >&2
  "$py" benchmarks/scale_7b.py --micro-only --device "$device" --hidden "$hidden" --out "$out/scale_7b_micro.json" \
    > /dev/null
}

part5() {
  echo "== 5. the cost model's memory for the measured plans; the timings" >&2
  "$py" benchmarks/gpu_check_summary.py "$out"
}

part6() {
  echo "== 6. time_to_quality on the $device's measured clock" >&2
  local data=${FEDPIPE_SHARED_DATA:-}
  if [[ -z $data || ! -d $data/models/stories260K-hf ]]; then
    echo "clock: skipped: set FEDPIPE_SHARED_DATA to the folder holding models/stories260K-hf and e2e/"
    return
  fi
  # one run for both profiles: seed by seed, every profile early on; eval.final_full=false: the whole-dev-set
  # eval at the end is on no clock
  timeout "${GPU_CHECK_CLOCK_S:-330}" "$py" benchmarks/time_to_quality.py eval.final_full=false \
    --stories-path "$data" "${clock[@]}" --ablation --rows lora_hb tuned+carry=adapter tuned+measured \
    --stop-clocks time_s --workdir "$out/clock" --out "$out/clock.json" > "$out/clock.md" 2> "$out/clock.log" \
    || echo "clock: stopped (exit $?) after ${GPU_CHECK_CLOCK_S:-330} s; the seeds finished are kept"
  "$py" benchmarks/gpu_check_summary.py "$out" --clock
}

part7() {
  echo "== 7. every method and switch, 2 rounds of the quickstart on $device, side by side" >&2
  local n ov rows
  # the benchmarks' method rows (benchmarks/_jobs.py) and the centralized limit, then the state-keeping switches
  rows=$("$py" -c 'import sys; sys.path.insert(0, "benchmarks"); from _jobs import CENTRAL, METHODS
for name, ov in {**METHODS, "central": CENTRAL}.items(): print(name, *ov)')
  rows+=$'\nshared_a method=fedpipe lora.carry=shared_a\nmoments method=lora_hb train.optimizer_state=kept'
  rows+=$'\nfedadam method=fedpipe aggregation.server_opt=fedadam'
  rows+=$'\ndense method=fedpipe plan.variant=paper aggregation.transport=dense'
  rows+=$'\nbf16 method=fedpipe aggregation.wire=bf16\nmeasured method=fedpipe plan.step_cost=measured'
  mkdir -p "$out/methods"
  while read -r n ov; do
    # shellcheck disable=SC2086  # the overrides split on spaces
    "$py" -m fedpipe_dist run jobs/quickstart.yaml "${small[@]}" $ov "output.dir=$out/methods/$n" \
      --no-progress > /dev/null 2> "$out/methods/$n.log" &
  done <<< "$rows"
  wait
  for n in $(cut -d' ' -f1 <<< "$rows" | sort); do
    if grep -q '^done:' "$out/methods/$n.log"; then
      echo "method $n: ok: $(grep '^done:' "$out/methods/$n.log")"
    else
      echo "method $n: FAILED: $(grep -m1 -E 'Error|error:' "$out/methods/$n.log" || tail -n 1 "$out/methods/$n.log")"
    fi
  done
}

for p in $parts; do
  "part$p"
done
echo "gpu_check: done in $(( SECONDS - t0 )) s on $device; outputs in $out" >&2
