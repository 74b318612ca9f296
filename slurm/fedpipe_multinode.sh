#!/bin/bash
# Template: any job on N nodes x G GPUs (N*G edge servers). Copy it, set the #SBATCH lines and the default job.
#
#   sbatch --nodes=4 --gres=gpu:4 slurm/fedpipe_multinode.sh jobs/e2e_gpt2_medium.yaml clients.n=16
#
# One task per node runs torchrun with G ranks; all nodes meet at a c10d rendezvous on the first node of the
# allocation (its host name from scontrol, the port from FEDPIPE_PORT). clients.n may exceed N*G: the extra
# edge servers share ranks (server c on rank c mod world size). Model and data paths, offline use, submitting
# from any directory and the environment variables: see slurm/fedpipe_gpt2.sh and docs/hpc.md.
# Your cluster: most need an account and a partition (sinfo lists partitions; sacctmgr show assoc user=$USER
# your accounts); remove one '#' to use a line.
##SBATCH --account=<your project>
##SBATCH --partition=<gpu partition>
##SBATCH --qos=<qos>
#SBATCH --job-name=fedpipe
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
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
