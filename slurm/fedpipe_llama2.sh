#!/bin/bash
# FedPipe: LLaMA2-7B on Alpaca, 16 edge servers: 2 nodes x 8 GPUs, one torchrun per node (srun) with a c10d
# rendezvous on the first node. On one node with 16 GPUs: sbatch --nodes=1 --gres=gpu:16 slurm/fedpipe_llama2.sh
#
#   sbatch slurm/fedpipe_llama2.sh                                  # jobs/alpaca_llama2_7b.yaml
#   sbatch slurm/fedpipe_llama2.sh jobs/alpaca_llama2_7b.yaml \
#       model.name_or_path=/shared/models/Llama-2-7b-hf data.train_path=/shared/data/alpaca_data.json
#   FEDPIPE_CPU=1 FEDPIPE_NPROC=2 sbatch --nodes=1 --gres=none --cpus-per-task=2 slurm/fedpipe_llama2.sh \
#       jobs/quickstart.yaml model.name_or_path=tiny-llama          # CPU variant
#
# Before the first job (docs/hpc.md has the whole checklist):
# - Compute nodes usually cannot reach the Hugging Face hub, and Llama-2 is gated there: download the model
#   and the data once on a login node (huggingface-cli download meta-llama/Llama-2-7b-hf --local-dir ...;
#   tatsu-lab/alpaca's alpaca_data.json), pass their shared-filesystem paths as above, and export
#   HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 so nothing waits on the network.
# - fedpipe check JOB.yaml [overrides] --nproc 16 reads the model folder, the data and output.dir before you queue.
# - Progress: one line per round in <job name>-<job id>.out (round, eval loss, seconds, elapsed, ETA, bytes).
#
# Same environment variables as slurm/fedpipe_gpt2.sh.
# Your cluster: most need an account and a partition (sinfo lists partitions; sacctmgr show assoc user=$USER
# your accounts); remove one '#' to use a line.
##SBATCH --account=<your project>
##SBATCH --partition=<gpu partition>
##SBATCH --qos=<qos>
#SBATCH --job-name=fedpipe-llama2
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
# Host memory: each rank loads the base into host memory before moving it to its GPU, so a node needs about
# ranks x model size at once (8 x 13.5 GB for LLaMA-2-7B in bfloat16) plus the data; --mem=0 asks for all
# of the node's memory where the cluster's default per-CPU share is smaller.
##SBATCH --mem=0
#SBATCH --output=%x-%j.out
set -euo pipefail
if [[ -z ${SLURM_JOB_ID:-} ]]; then
  echo "fedpipe slurm: this is a Slurm batch script; submit it with sbatch $0 [JOB.yaml] [key=value ...] (docs/hpc.md)" >&2
  exit 2
fi
# Your cluster's software, if it uses environment modules (module avail lists them), e.g.:
# module load cuda/12.1 python/3.11
export FEDPIPE_DEFAULT_JOB=jobs/alpaca_llama2_7b.yaml
# Slurm runs a copy of this script from its spool folder: the repository is found from the path it was
# submitted with (scontrol's Command=), or FEDPIPE_HOME when set (a copy of this script kept elsewhere).
repo=${FEDPIPE_HOME:-$(dirname "$(dirname "$(scontrol show job "$SLURM_JOB_ID" | sed -n '/^ *Command=/{s/^ *Command=\([^ ]*\).*/\1/p;q;}')")")}
if [[ ! -f $repo/slurm/_launch.sh ]]; then
  echo "fedpipe slurm: no slurm/_launch.sh in '$repo'; export FEDPIPE_HOME=/path/to/the/fedpipe_dist/checkout" >&2
  exit 2
fi
exec bash "$repo/slurm/_launch.sh" "$@"
