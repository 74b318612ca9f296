#!/bin/bash
# Template: any job on N nodes x G GPUs (N*G edge servers). Copy it, set the #SBATCH lines and the default job.
#
#   sbatch --nodes=4 --gres=gpu:4 slurm/fedpipe_multinode.sh jobs/e2e_gpt2_medium.yaml clients.n=16
#
# One task per node runs torchrun with G ranks; all nodes meet at a c10d rendezvous on the first node of the
# allocation (its host name from scontrol, the port from FEDPIPE_PORT). clients.n may exceed N*G: the extra
# edge servers share ranks (server c on rank c mod world size).
#SBATCH --job-name=fedpipe
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
export FEDPIPE_DEFAULT_JOB=jobs/e2e_gpt2_medium.yaml
exec bash "${SLURM_SUBMIT_DIR:-.}/slurm/_launch.sh" "$@"
