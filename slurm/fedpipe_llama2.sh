#!/bin/bash
# FedPipe: LLaMA2-7B on Alpaca, 16 edge servers: 2 nodes x 8 GPUs, one torchrun per node (srun) with a c10d
# rendezvous on the first node. On one node with 16 GPUs: sbatch --nodes=1 --gres=gpu:16 slurm/fedpipe_llama2.sh
#
#   sbatch slurm/fedpipe_llama2.sh                                  # jobs/alpaca_llama2_7b.yaml
#   sbatch slurm/fedpipe_llama2.sh jobs/alpaca_llama2_7b.yaml model.name_or_path=/path/to/Llama-2-7b-hf
#   FEDPIPE_CPU=1 FEDPIPE_NPROC=2 sbatch --nodes=1 --gres=none --cpus-per-task=2 slurm/fedpipe_llama2.sh \
#       jobs/quickstart.yaml model.name_or_path=tiny-llama          # CPU variant
#
# Same environment variables as slurm/fedpipe_gpt2.sh.
#SBATCH --job-name=fedpipe-llama2
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
export FEDPIPE_DEFAULT_JOB=jobs/alpaca_llama2_7b.yaml
exec bash "${SLURM_SUBMIT_DIR:-.}/slurm/_launch.sh" "$@"
