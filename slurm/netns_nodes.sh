#!/bin/bash
# Cluster nodes on one machine, for multi-node tests: Linux network namespaces on a private bridge, each with
# its own address and (through `run`) its own host name, all sharing this machine's filesystem as cluster nodes
# share a parallel filesystem. Needs root and iproute2 (`ip netns`).
#
#   slurm/netns_nodes.sh up NAME N     # namespaces NAME-0 .. NAME-(N-1) on bridge NAME-br; prints one line per
#                                      #   node: "<namespace> <address> <hostname>"
#   slurm/netns_nodes.sh run NAME I CMD...   # CMD inside node I, with host name NAME-I (a private UTS namespace)
#   slurm/netns_nodes.sh cut NAME I    # take node I's link down (a lost node: its packets go nowhere)
#   slurm/netns_nodes.sh down NAME     # remove the namespaces, their links and the bridge
#
# Addresses: 10.R.S.(I+2)/24 with R.S derived from NAME, so that two harnesses with different names do not
# collide. Traffic stays between these namespaces: the bridge has no uplink and no route leaves them.
set -euo pipefail
cmd=${1:?usage: netns_nodes.sh up|run|cut|down NAME ...}
name=${2:?usage: netns_nodes.sh up|run|cut|down NAME ...}
[[ $name =~ ^[a-z][a-z0-9]{0,7}$ ]] || { echo "netns_nodes: NAME must be 1-8 lower-case letters/digits (interface names are short)" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "netns_nodes: needs root (ip netns)" >&2; exit 2; }

subnet() {  # 10.R.S from a hash of NAME
  local h
  h=$(printf '%s' "$name" | cksum | cut -d' ' -f1)
  echo "10.$(( 200 + h % 50 )).$(( (h / 50) % 250 ))"
}
addr() { echo "$(subnet).$(( $1 + 2 ))"; }

case $cmd in
  up)
    n=${3:?usage: netns_nodes.sh up NAME N}
    ip link add "$name-br" type bridge
    ip link set "$name-br" up
    for i in $(seq 0 $(( n - 1 ))); do
      ns="$name-$i"
      ip netns add "$ns"
      ip link add "$name-v$i" type veth peer name "$name-p$i"
      ip link set "$name-p$i" netns "$ns"
      ip link set "$name-v$i" master "$name-br"
      ip link set "$name-v$i" up
      ip -n "$ns" link set lo up
      ip -n "$ns" link set "$name-p$i" name eth0
      ip -n "$ns" addr add "$(addr "$i")/24" dev eth0
      ip -n "$ns" link set eth0 up
    done
    # every node resolves every node's host name (a hosts file per namespace, bind-mounted over /etc/hosts by
    # `run`)
    for i in $(seq 0 $(( n - 1 ))); do
      mkdir -p "/etc/netns/$name-$i"
      { echo "127.0.0.1 localhost"; for j in $(seq 0 $(( n - 1 ))); do echo "$(addr "$j") $name-$j"; done; } \
        > "/etc/netns/$name-$i/hosts"
      echo "$name-$i $(addr "$i") $name-$i"
    done
    ;;
  run)
    i=${3:?usage: netns_nodes.sh run NAME I CMD...}
    shift 3
    # nsenter, not `ip netns exec`: that remounts /sys, and slurmd needs the host's cgroup mounts below it.
    # Private UTS and mount namespaces give the node its host name and its hosts file.
    # shellcheck disable=SC2016  # $0 and $@ are the inner shell's
    exec nsenter --net="/run/netns/$name-$i" unshare --uts --mount --propagation private /bin/sh -c \
      'hostname "$0" && mount --bind "/etc/netns/$0/hosts" /etc/hosts && exec "$@"' "$name-$i" "$@"
    ;;
  cut)
    i=${3:?usage: netns_nodes.sh cut NAME I}
    ip link set "$name-v$i" down
    ;;
  down)
    for ns in $(ip netns list | awk '{print $1}' | grep -E "^$name-[0-9]+$" || true); do
      ip netns del "$ns"
      rm -rf "/etc/netns/$ns"
    done
    for link in $(ip -o link show | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^$name-(v[0-9]+|br)$" || true); do
      ip link del "$link" 2>/dev/null || true
    done
    ;;
  *)
    echo "netns_nodes: unknown command $cmd (up, run, cut, down)" >&2; exit 2 ;;
esac
