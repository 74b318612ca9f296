#!/bin/bash
# FedPipe: GPT-2 on E2E, one node, 4 edge servers (one rank per GPU), rank 0 also the central server.
#
#   sbatch slurm/fedpipe_gpt2.sh                                   # jobs/e2e_gpt2_medium.yaml on 4 GPUs
#   sbatch slurm/fedpipe_gpt2.sh jobs/e2e_gpt2_medium.yaml rounds=50      # a job file and dotted.key=value overrides
#   FEDPIPE_CPU=1 FEDPIPE_NPROC=2 sbatch --gres=none --cpus-per-task=2 slurm/fedpipe_gpt2.sh jobs/quickstart.yaml
#                                                                  # CPU variant (tests, laptops): gloo ranks
#
# Submit from any directory: the job file is found there or in the repository; runs/ and the job file's
# relative paths are the submit directory's. Offline compute nodes: point model.name_or_path and
# data.train_path/eval_path at copies on the shared filesystem and export HF_HUB_OFFLINE=1 (docs/hpc.md).
# Results: $FEDPIPE_RUNS/<job name>-<job id>/ (default runs/ in the submit directory): results.h5, final/;
# the log <job name>-<job id>.out has one line per round (eval loss, seconds, elapsed, ETA, bytes).
# Environment: FEDPIPE_PYTHON (default: the repository's .venv/bin/python, else python3), FEDPIPE_HOME (the
# repository, when scontrol cannot tell), FEDPIPE_RUNS, FEDPIPE_CPU=1 (no GPUs), FEDPIPE_NPROC (ranks per
# node; default: GPUs on the node, or the task's CPUs on the CPU variant), FEDPIPE_PORT (rendezvous port,
# default 29500 + job id mod 1000), FEDPIPE_MAX_RESTARTS (torchrun restarts of failed ranks).
# Your cluster: most need an account and a partition (sinfo lists partitions; sacctmgr show assoc user=$USER
# your accounts); remove one '#' to use a line.
##SBATCH --account=<your project>
##SBATCH --partition=<gpu partition>
##SBATCH --qos=<qos>
#SBATCH --job-name=fedpipe-gpt2
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
# Host memory: each rank loads the base into host memory before moving it to its GPU (ranks x model
# size at once); --mem=0 asks for all of the node's memory.
##SBATCH --mem=0
#SBATCH --output=%x-%j.out
set -euo pipefail
if [[ -z ${SLURM_JOB_ID:-} ]]; then
  echo "fedpipe slurm: this is a Slurm batch script; submit it with sbatch $0 [JOB.yaml] [key=value ...] (docs/hpc.md)" >&2
  exit 2
fi
# Your cluster's software, if it uses environment modules (module avail lists them), e.g.:
# module load cuda/12.1 python/3.11
export FEDPIPE_DEFAULT_JOB=jobs/e2e_gpt2_medium.yaml
# Slurm runs a copy of this script from its spool folder: the repository is found from the path it was
# submitted with (scontrol's Command=), or FEDPIPE_HOME when set (a copy of this script kept elsewhere).
repo=${FEDPIPE_HOME:-$(dirname "$(dirname "$(scontrol show job "$SLURM_JOB_ID" | sed -n '/^ *Command=/{s/^ *Command=\([^ ]*\).*/\1/p;q;}')")")}
if [[ ! -f $repo/slurm/_launch.sh ]]; then
  echo "fedpipe slurm: no slurm/_launch.sh in '$repo'; export FEDPIPE_HOME=/path/to/the/fedpipe_dist/checkout" >&2
  exit 2
fi
exec bash "$repo/slurm/_launch.sh" "$@"
