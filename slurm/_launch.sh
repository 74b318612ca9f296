#!/bin/bash
# Shared body of the sbatch scripts in this folder (run inside an allocation): srun starts one torchrun per
# node, torchrun starts the ranks, and all of them rendezvous (c10d) on the allocation's first node.
# Arguments: [JOB.yaml] [dotted.key=value ...]; the job defaults to $FEDPIPE_DEFAULT_JOB.
#
# Paths: the job file is looked up in the submit directory, then in the repository (so `sbatch
# /path/to/fedpipe_dist/slurm/fedpipe_gpt2.sh` works from anywhere); relative paths inside the job file
# (data, model) and the runs/ folder are relative to the submit directory.
set -euo pipefail
: "${SLURM_JOB_ID:?run this through sbatch (or salloc), not directly}"
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "${SLURM_SUBMIT_DIR:-.}"

job=${FEDPIPE_DEFAULT_JOB:-jobs/quickstart.yaml}
if [[ $# -gt 0 && $1 != *=* ]]; then
  job=$1
  shift
fi
if [[ ! -f $job && $job != /* && -f $repo/$job ]]; then
  job=$repo/$job
fi
if [[ ! -f $job ]]; then
  echo "fedpipe slurm: job file '$job' not found in the submit directory $PWD nor in $repo" >&2
  exit 2
fi

py=${FEDPIPE_PYTHON:-}
if [[ -z $py ]]; then
  if [[ -x $repo/.venv/bin/python ]]; then py=$repo/.venv/bin/python; else py=python3; fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # fedpipe_dist importable by any python given

nodes=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
head=${FEDPIPE_RDZV_HOST:-$(echo "$nodes" | head -n 1)}  # FEDPIPE_RDZV_HOST: the first node's private address (docs/hpc.md)
nnodes=${SLURM_NNODES:-1}
cpus=${SLURM_CPUS_PER_TASK:-1}
if [[ ${FEDPIPE_CPU:-0} == 1 ]]; then
  nproc=${FEDPIPE_NPROC:-$cpus}
  export OMP_NUM_THREADS=1
else
  # the GPUs this allocation gives the node (not every GPU the node has): Slurm's count, else the visible devices
  if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
    gpus=$SLURM_GPUS_ON_NODE
  elif [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    gpus=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c . || true)
  else
    gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  fi
  nproc=${FEDPIPE_NPROC:-${gpus:-0}}
  if [[ $nproc -lt 1 ]]; then
    echo "fedpipe slurm: no GPU visible on $(hostname); request GPUs (--gres=gpu:N) or set FEDPIPE_CPU=1" >&2
    exit 2
  fi
  threads=$(( cpus / nproc ))  # the task's CPUs shared by its ranks
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}
fi
port=${FEDPIPE_PORT:-$(( 29500 + SLURM_JOB_ID % 1000 ))}
out="${FEDPIPE_OUTPUT:-${FEDPIPE_RUNS:-runs}/${SLURM_JOB_NAME:-fedpipe}-${SLURM_JOB_ID}}"  # FEDPIPE_OUTPUT: a sweep point's folder
# A requeued job (preemption, node failure; sbatch --requeue) keeps its id, so it finds its own output folder
# and continues from the newest checkpoint. FEDPIPE_MAX_RESTARTS lets torchrun restart ranks that died.
resume=()
if [[ ${SLURM_RESTART_COUNT:-0} -gt 0 ]]; then
  resume=(resume=true)
fi

echo "fedpipe slurm: job $SLURM_JOB_ID, $nnodes node(s) x $nproc rank(s), rendezvous $head:$port, job $job -> $out" >&2
# Slurm 22.05+ no longer passes sbatch's --cpus-per-task on to srun: say it again, or torchrun's ranks share one CPU.
export SRUN_CPUS_PER_TASK=$cpus
srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --cpus-per-task="$cpus" --kill-on-bad-exit=1 \
  "$py" -m torch.distributed.run --nnodes="$nnodes" --nproc_per_node="$nproc" \
  --max-restarts="${FEDPIPE_MAX_RESTARTS:-0}" \
  --rdzv_backend=c10d --rdzv_endpoint="$head:$port" --rdzv_id="$SLURM_JOB_ID" \
  -m fedpipe_dist run "$job" "$@" "output.dir=$out" ${resume[@]+"${resume[@]}"} --no-progress
