#!/bin/bash
# The GPU check: what has to hold on CUDA, in one run of at most 8 minutes on one GPU. Run it whenever a GPU
# machine is at hand and copy its summary into benchmarks/README.md with the date and the device.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # on a GPU machine (torch, transformers, peft, bitsandbytes)
#   bash benchmarks/gpu_check.sh --cpu [OUT_DIR]    # the same steps on the CPU at toy sizes (tests: a dry run)
#
# 1. the quickstart on CUDA (2 rounds, one process: every server on the GPU);
# 2. the quickstart with NF4 bases through bitsandbytes (quant.backend=bitsandbytes) on CUDA;
# 3. benchmarks/step_vs_peft.py: the engine's step vs peft on the 34M/29M models, then on a random-init Llama of
#    about 1.1B parameters (fp32), then that model's NF4 base: the engine's vs peft + bitsandbytes QLoRA;
#    tokens/s, GFLOP/s against the measured matmul peak, peak memory;
# 4. benchmarks/scale_7b.py --micro-only: one LLaMA-2-7B layer's merge, its fidelity check and the importance
#    measurement, timed on the device (what scale_7b.py's A100 column estimates from the CPU);
# 5. the cost model's memory prediction for the 1.1B plan, next to the measured peak.
# Each step's JSON and log go to OUT_DIR (default benchmarks/out/gpu_check); the summary to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
cpu=0
if [[ ${1:-} == --cpu ]]; then
  cpu=1
  shift
fi
out=${1:-benchmarks/out/gpu_check}
mkdir -p "$out"
py=${FEDPIPE_PYTHON:-}
if [[ -z $py ]]; then
  if [[ -x .venv/bin/python ]]; then py=.venv/bin/python; else py=python3; fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
small=(rounds=2 train.local_steps=4 data.synthetic_train_size=128 data.synthetic_eval_size=32 eval.max_samples=32
       clients.slowdown=1 output.overwrite=true)
if [[ $cpu == 1 ]]; then
  device=cpu
  export CUDA_VISIBLE_DEVICES=  # the CPU even on a GPU machine
  nf4=(quant.backend=native)  # bitsandbytes' NF4 kernels are CUDA's; the native NF4 is byte-identical
  steps=(--steps 2 --repeats 1 --only llama-34M)
  big=()
  hidden=2048
else
  device=cuda
  "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "gpu_check: no CUDA device (use --cpu for the dry run)")'
  nf4=(quant.backend=bitsandbytes)
  steps=(--steps 8 --repeats 3)
  big=(--big --steps 4 --repeats 2)
  hidden=4096
fi
t0=$SECONDS
echo "== 1. quickstart on $device" >&2
"$py" -m fedpipe_dist run jobs/quickstart.yaml "${small[@]}" \
  "output.dir=$out/quickstart" --no-progress 2> "$out/quickstart.log"
tail -n 1 "$out/quickstart.log"
echo "== 2. NF4 bases ($device, ${nf4[*]})" >&2
"$py" -m fedpipe_dist run jobs/quickstart.yaml "${small[@]}" clients.precision=nf4 "${nf4[@]}" \
  "output.dir=$out/nf4" --no-progress 2> "$out/nf4.log"
tail -n 1 "$out/nf4.log"
echo "== 3. step vs peft ($device)" >&2
"$py" benchmarks/step_vs_peft.py --device "$device" "${steps[@]}" --out "$out/step_vs_peft.json"
if [[ ${#big[@]} -gt 0 ]]; then
  "$py" benchmarks/step_vs_peft.py --device "$device" "${big[@]}" --out "$out/step_vs_peft_1b.json"
  "$py" benchmarks/step_vs_peft.py --device "$device" "${big[@]}" --qlora --out "$out/step_vs_peft_1b_qlora.json"
fi
echo "== 4. one 7B-wide layer's merge, fidelity check and importance ($device)" >&2
"$py" benchmarks/scale_7b.py --micro-only --device "$device" --hidden "$hidden" --out "$out/scale_7b_micro.json" \
  > /dev/null
echo "== 5. the cost model's memory for the measured plans" >&2
"$py" - "$out" <<'PY'
import json, sys
from pathlib import Path
from fedpipe_dist.io.hdf5 import Results
out = Path(sys.argv[1])
for name in ("quickstart", "nf4"):
    r = Results(out / name / "results.h5")
    pred, meas = r.clients["pred_mem_bytes"][1:], r.clients["peak_mem_bytes"][1:]
    print(f"{name}: final eval loss {r.last_eval_loss():.4f}; peak memory measured / predicted per server: "
          + ", ".join(f"{m / 2**20:.0f}/{p / 2**20:.0f} MiB" for m, p in zip(meas[-1], pred[-1])))
for f in sorted(out.glob("step_vs_peft*.json")):
    d = json.loads(f.read_text())
    for m, v in d["models"].items():
        mem = f", peak {v['peak_mem_bytes'] / 2**30:.1f} GiB" if v.get("peak_mem_bytes") else ""
        print(f"{f.stem} {m}: engine {v['median_tokens_per_s']['engine']:.0f} tok/s vs peft "
              f"{v['median_tokens_per_s']['peft']:.0f} ({v['engine_vs_peft']:.3f}x), engine "
              f"{v['share_of_peak']['engine']:.0%} of the matmul peak{mem}")
m = json.loads((out / "scale_7b_micro.json").read_text())
print(f"scale_7b micro ({m['device']}, {m['hidden']} wide, stacked rank {m['stack_rank']}): merge {m['merge_s']:.4f} s "
      f"per layer, sampled check {m['check_s']:.4f} s, exact check {m['exact_check_s']:.4f} s, importance "
      f"{m['importance_s']:.4f} s, copy bandwidth {m['copy_bw'] / 1e9:.0f} GB/s")
PY
echo "gpu_check: done in $(( SECONDS - t0 )) s on $device; outputs in $out" >&2
