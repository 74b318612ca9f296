#!/bin/bash
# An ssh stand-in for launchers that start remote processes through ssh (Open MPI's mpirun), for nodes made by
# slurm/netns_nodes.sh: `netns_ssh.sh [ssh options] NAME-I COMMAND...` runs COMMAND on node I of NAME.
#   PRTE_MCA_plm_ssh_agent=$PWD/slurm/netns_ssh.sh mpirun --host NAME-0:2,NAME-1:2 ...   (from node 0)
set -euo pipefail
while [[ $# -gt 0 && $1 == -* ]]; do shift; done  # ssh's options (-x, ...) mean nothing here
host=${1:?usage: netns_ssh.sh [options] NAME-I COMMAND...}
shift
[[ $host =~ ^([a-z][a-z0-9]*)-([0-9]+)$ ]] || { echo "netns_ssh: '$host' is not a node NAME-I of netns_nodes.sh" >&2; exit 255; }
exec bash "$(dirname "${BASH_SOURCE[0]}")/netns_nodes.sh" run "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" /bin/sh -c "$*"
