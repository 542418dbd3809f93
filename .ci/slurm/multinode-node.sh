#!/usr/bin/env bash
# The "init" of one emulated node of .ci/slurm/start-multinode.sh: PID 1 of the node's own UTS + mount + PID
# namespaces. Usage (by start-multinode.sh only): multinode-node.sh <node name> <cluster dir>
# Sets the node's hostname, mounts the cluster's hosts file over /etc/hosts and the node's own folder over
# <cluster dir>/node (spool, pid file, log: the paths slurm.conf names) -- inside this node only -- then runs
# slurmd in the foreground. When slurmd ends, this init ends, and the kernel kills every process left in the node.
set -euo pipefail
name=$1 dir=$2
hostname "$name"
mount --bind "$dir/hosts" /etc/hosts
mount --bind "$dir/nodes/$name" "$dir/node"
export SLURM_CONF=$dir/slurm.conf
echo "node $name: pid $$ in its namespace, hostname $(hostname), $(getent hosts "$name")"
# slurmd in the foreground as a child; as PID 1 this shell also reaps the orphans slurmstepd leaves
slurmd -D -N "$name" &
wait $!
