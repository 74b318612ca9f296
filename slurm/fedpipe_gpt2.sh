#!/bin/bash
# FedPipe: GPT-2 on E2E, one node, 4 edge servers (one rank per GPU), rank 0 also the central server.
#
#   sbatch slurm/fedpipe_gpt2.sh                                   # jobs/e2e_gpt2_medium.yaml on 4 GPUs
#   sbatch slurm/fedpipe_gpt2.sh jobs/e2e_gpt2_medium.yaml rounds=50      # a job file and dotted.key=value overrides
#   FEDPIPE_CPU=1 FEDPIPE_NPROC=2 sbatch --gres=none --cpus-per-task=2 slurm/fedpipe_gpt2.sh jobs/quickstart.yaml
#                                                                  # CPU variant (tests, laptops): gloo ranks
#
# Results: $FEDPIPE_RUNS/<job name>-<job id>/ (default runs/ in the submit directory): results.h5, final/.
# Environment: FEDPIPE_PYTHON (default: .venv/bin/python in the submit directory, else python3),
# FEDPIPE_RUNS, FEDPIPE_CPU=1 (no GPUs), FEDPIPE_NPROC (ranks per node; default: GPUs on the node, or
# the task's CPUs on the CPU variant), FEDPIPE_PORT (rendezvous port, default 29500 + job id mod 1000).
#SBATCH --job-name=fedpipe-gpt2
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
export FEDPIPE_DEFAULT_JOB=jobs/e2e_gpt2_medium.yaml
exec bash "${SLURM_SUBMIT_DIR:-.}/slurm/_launch.sh" "$@"
