#!/bin/bash
# A real one-node Slurm cluster in a folder, for tests and laptops (Debian/Ubuntu: apt-get install slurm-wlm munge).
#
#   slurm/local_cluster.sh start DIR [CPUS]    # munged (as the munge user), slurmctld, slurmd; prints SLURM_CONF=...
#                                              (CPUS: at most the machine's, default all of them)
#   SLURM_CONF=DIR/slurm.conf sbatch ...      # submit to it
#   slurm/local_cluster.sh stop DIR            # stops the three daemons by the PIDs in their pid files
#
# Several nodes (issue 29): FEDPIPE_NODES=N slurm/local_cluster.sh start DIR [CPUS] makes N nodes with
# slurm/netns_nodes.sh (network namespaces NAME-0 .. NAME-(N-1), NAME in DIR/nodes), runs slurmctld on node 0 and
# one slurmd in each node's namespace (NodeAddr = that namespace's address, CPUS each), so that sbatch and srun
# place tasks on different hosts for real. The cluster's address is inside the nodes: run the Slurm commands on
# node 0, e.g. slurm/netns_nodes.sh run NAME 0 env SLURM_CONF=DIR/slurm.conf sbatch ... (printed at start).
#
# Everything (config, state, spool, logs, pid files, the munge socket) lives under DIR; ports are picked free.
# Needs root (slurmd runs jobs as their users; munged as munge).
set -euo pipefail
cmd=${1:?usage: local_cluster.sh start|stop DIR [CPUS]}
dir=$(mkdir -p "${2:?usage: local_cluster.sh start|stop DIR [CPUS]}" && cd "$2" && pwd)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
nodes=${FEDPIPE_NODES:-1}
[[ $nodes =~ ^[1-9][0-9]?$ ]] || { echo "local_cluster: FEDPIPE_NODES must be a number of nodes, 1-99 (got $nodes)" >&2; exit 2; }

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
    if [[ $nodes -gt 1 ]]; then  # nodes in network namespaces; their name is kept for `stop`
      name=fps$(printf '%s' "$dir" | cksum | cut -d' ' -f1 | tail -c 6)
      echo "$name $nodes" > "$dir/nodes"
      bash "$here/netns_nodes.sh" down "$name"  # what a killed earlier cluster of this folder left
      mapfile -t rows < <(bash "$here/netns_nodes.sh" up "$name" "$nodes")
      ctld_host="$name-0($(awk '{print $2}' <<<"${rows[0]}"))"
      node_lines=$(for r in "${rows[@]}"; do
        read -r _ a h <<<"$r"; echo "NodeName=$h NodeAddr=$a CPUs=$cpus State=UNKNOWN"; done)
      partition="PartitionName=local Nodes=$name-[0-$(( nodes - 1 ))] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
      mkdir -p "$dir/spool"
      per_node=%n  # one spool folder, pid file and log per slurmd
      # a lost node is marked down (and its jobs requeued, sbatch --requeue) after 5 s instead of 300 s, and a
      # killed job's steps get SIGKILL 5 s after SIGTERM (KillWait, 30 s by default)
      timeouts=$'SlurmdTimeout=5\nKillWait=5'
    else
      ctld_host="localhost(127.0.0.1)"
      node_lines="NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN"
      partition="PartitionName=local Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
      per_node=""
      timeouts=""
    fi
    cat > "$dir/slurm.conf" <<CONF
ClusterName=fedpipe-local
SlurmctldHost=$ctld_host
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$mdir/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool${per_node:+/$per_node}
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd${per_node:+.$per_node}.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd${per_node:+.$per_node}.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
$timeouts
SchedulerType=sched/backfill
$node_lines
$partition
CONF
    export SLURM_CONF=$dir/slurm.conf
    trap 'bash "$0" stop "$dir"' ERR  # a daemon that fails to start takes the others down with it
    if [[ $nodes -gt 1 ]]; then
      on() { bash "$here/netns_nodes.sh" run "$name" "$@"; }
      on 0 slurmctld -f "$SLURM_CONF"
      for i in $(seq 0 $(( nodes - 1 ))); do
        mkdir -p "$dir/spool/$name-$i"
        on "$i" slurmd -f "$SLURM_CONF" -N "$name-$i"
      done
    else
      on() { shift; "$@"; }
      slurmctld -f "$SLURM_CONF"
      slurmd -f "$SLURM_CONF" -N localhost
    fi
    for _ in $(seq 150); do  # wait until every node is idle
      if [[ $(on 0 sinfo -h -N -o '%t' 2>/dev/null | grep -c idle) -ge $nodes ]]; then
        echo "SLURM_CONF=$SLURM_CONF"
        if [[ $nodes -gt 1 ]]; then
          echo "NODES=$name $nodes  # Slurm commands run on node 0: $here/netns_nodes.sh run $name 0 env SLURM_CONF=$SLURM_CONF sbatch ..."
        fi
        exit 0
      fi
      sleep 0.2
    done
    echo "local_cluster: the node did not come up; logs in $dir/log" >&2
    on 0 sinfo -N -l >&2 || true
    exit 1
    ;;
  stop)
    for f in "$dir"/slurmd*.pid; do stop_pid "$f"; done
    stop_pid "$dir/slurmctld.pid"
    stop_pid "$dir/munged.pid"
    if [[ -f $dir/nodes ]]; then
      bash "$here/netns_nodes.sh" down "$(awk '{print $1}' "$dir/nodes")"
      rm -f "$dir/nodes"
    fi
    if [[ -L $dir/munge ]]; then
      rm -rf "$(readlink "$dir/munge")" "$dir/munge"
    fi
    ;;
  *)
    echo "local_cluster: unknown command '$cmd' (start|stop)" >&2
    exit 2
    ;;
esac
