#!/bin/bash
# One point of a campaign (fedpipe_dist/campaign.py) per Slurm array task. Submit with
#
#   fedpipe sweep jobs/paper_small.yaml --slurm [sbatch options]     # sbatch --array=<points not done> this script
#
# Each task asks `fedpipe sweep SWEEP --point $SLURM_ARRAY_TASK_ID --args` for its point's job and overrides
# (resume=true when the point has a checkpoint; nothing when it is already done) and runs them as the other
# scripts here do (srun + torchrun, slurm/_launch.sh), writing into the point's folder. Rerunning the submit
# command later submits only the points still not done. Environment as in _launch.sh (FEDPIPE_CPU=1,
# FEDPIPE_NPROC, FEDPIPE_PYTHON, FEDPIPE_HOME, FEDPIPE_MAX_RESTARTS). The sweep file and its out folder are
# relative to the submit directory (where `fedpipe sweep --slurm` ran).
# Your cluster: most need an account and a partition (sinfo lists partitions; sacctmgr show assoc user=$USER
# your accounts); remove one '#' to use a line. Each task needs the GPUs of its point's world size: the
# gres line below is for points of 4 ranks (pass --gres=gpu:N to fedpipe sweep --slurm for others, or
# --gres=none with FEDPIPE_CPU=1).
##SBATCH --account=<your project>
##SBATCH --partition=<gpu partition>
##SBATCH --qos=<qos>
##SBATCH --mem=0
#SBATCH --job-name=fedpipe-sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --output=%x-%A_%a.out
set -euo pipefail
if [[ -z ${SLURM_JOB_ID:-} ]]; then
  echo "fedpipe sweep: this is a Slurm array script; submit it with fedpipe sweep SWEEP.yaml --slurm" >&2
  exit 2
fi
: "${SLURM_ARRAY_TASK_ID:?submit this with fedpipe sweep SWEEP.yaml --slurm (an array job), not directly}"
repo=${FEDPIPE_HOME:-$(dirname "$(dirname "$(scontrol show job "$SLURM_JOB_ID" | sed -n '/^ *Command=/{s/^ *Command=\([^ ]*\).*/\1/p;q;}')")")}
if [[ ! -f $repo/slurm/_launch.sh ]]; then
  echo "fedpipe sweep: no slurm/_launch.sh in '$repo'; export FEDPIPE_HOME=/path/to/the/fedpipe_dist/checkout" >&2
  exit 2
fi
cd "${SLURM_SUBMIT_DIR:-.}"
sweep=${1:?usage: sbatch --array=... slurm/fedpipe_sweep.sh SWEEP.yaml}
py=${FEDPIPE_PYTHON:-}
if [[ -z $py ]]; then
  if [[ -x $repo/.venv/bin/python ]]; then py=$repo/.venv/bin/python; else py=python3; fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
if ! listing=$("$py" -m fedpipe_dist sweep "$sweep" --point "$SLURM_ARRAY_TASK_ID" --args); then
  echo "fedpipe sweep: cannot read point $SLURM_ARRAY_TASK_ID of $sweep (the error is above)" >&2
  exit 2
fi
if [[ -z $listing ]]; then
  echo "fedpipe sweep: point $SLURM_ARRAY_TASK_ID of $sweep is already done" >&2
  exit 0
fi
mapfile -t args <<< "$listing"
for a in "${args[@]}"; do
  if [[ $a == output.dir=* ]]; then export FEDPIPE_OUTPUT=${a#output.dir=}; fi
done
echo "fedpipe sweep: point $SLURM_ARRAY_TASK_ID of $sweep -> $FEDPIPE_OUTPUT" >&2
exec bash "$repo/slurm/_launch.sh" "${args[@]}"
