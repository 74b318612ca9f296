#!/bin/bash
# A real one-node Slurm cluster in a folder, for tests and laptops (Debian/Ubuntu: apt-get install slurm-wlm munge).
#
#   slurm/local_cluster.sh start DIR [CPUS]    # munged (as the munge user), slurmctld, slurmd; prints SLURM_CONF=...
#                                              (CPUS: at most the machine's, default all of them)
#   SLURM_CONF=DIR/slurm.conf sbatch ...      # submit to it
#   slurm/local_cluster.sh stop DIR            # stops the three daemons by the PIDs in their pid files
#
# Everything (config, state, spool, logs, pid files, the munge socket) lives under DIR; ports are picked free.
# Needs root (slurmd runs jobs as their users; munged as munge).
set -euo pipefail
cmd=${1:?usage: local_cluster.sh start|stop DIR [CPUS]}
dir=$(mkdir -p "${2:?usage: local_cluster.sh start|stop DIR [CPUS]}" && cd "$2" && pwd)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

stop_pid() {  # stop_pid FILE: TERM, wait up to 10 s, then KILL
  [[ -f $1 ]] || return 0
  local pid
  pid=$(cat "$1")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$1"
}

case $cmd in
  start)
    for tool in munged slurmctld slurmd; do
      command -v "$tool" >/dev/null || { echo "local_cluster: $tool not found; apt-get install slurm-wlm munge" >&2; exit 2; }
    done
    cpus=${3:-$(getconf _NPROCESSORS_ONLN)}  # not nproc: it answers OMP_NUM_THREADS
    mkdir -p "$dir"/{state,spool,log}
    key=/etc/munge/munge.key
    [[ -f $key ]] || { echo "local_cluster: $key missing; run mungekey --create as root" >&2; exit 2; }
    # munged runs as the munge user, who must reach its folder: a fresh one in /tmp, not below DIR (whose
    # parents may be private to root, like pytest's temp folders)
    mdir=$(mktemp -d /tmp/fedpipe-munge.XXXXXX)
    chmod 755 "$mdir"  # munged insists that everyone can reach its socket
    chown munge: "$mdir"
    ln -sfn "$mdir" "$dir/munge"
    runuser -u munge -- /usr/sbin/munged --socket="$mdir/munge.socket" --pid-file="$mdir/munged.pid" \
      --log-file="$mdir/munged.log" --seed-file="$mdir/munged.seed"
    cp "$mdir/munged.pid" "$dir/munged.pid"
    cat > "$dir/slurm.conf" <<CONF
ClusterName=fedpipe-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$mdir/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
    export SLURM_CONF=$dir/slurm.conf
    trap 'bash "$0" stop "$dir"' ERR  # a daemon that fails to start takes the others down with it
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF" -N localhost
    for _ in $(seq 100); do  # wait until the node is idle
      if sinfo -h -N -o '%t' 2>/dev/null | grep -q idle; then
        echo "SLURM_CONF=$SLURM_CONF"
        exit 0
      fi
      sleep 0.2
    done
    echo "local_cluster: the node did not come up; logs in $dir/log" >&2
    sinfo -N -l >&2 || true
    exit 1
    ;;
  stop)
    stop_pid "$dir/slurmd.pid"
    stop_pid "$dir/slurmctld.pid"
    stop_pid "$dir/munged.pid"
    if [[ -L $dir/munge ]]; then
      rm -rf "$(readlink "$dir/munge")" "$dir/munge"
    fi
    ;;
  *)
    echo "local_cluster: unknown command '$cmd' (start|stop)" >&2
    exit 2
    ;;
esac
