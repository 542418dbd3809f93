#!/usr/bin/env bash
# Stop the cluster of .ci/slurm/start-multinode.sh (every node, slurmctld, munged, by their pid files).
# Usage: bash .ci/slurm/stop-multinode.sh [--purge]   # --purge also deletes config, state and logs
#        bash .ci/slurm/stop-multinode.sh --node pln2   # "pull the plug" of one node: its slurmd and every task on it
#        (start-multinode.sh starts it again)
set -uo pipefail

DIR=${PROMPTLAUNCH_SLURM_MN_DIR:-/tmp/promptlaunch-slurm-mn}

stop() {  # stop <pid file> <name> [signal]: signal (TERM), wait up to 10 s, then KILL
    local pidfile=$1 name=$2 sig=${3:-TERM} pid
    [[ -s $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill -"$sig" "$pid" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
        echo "slurm-mn: stopped $name ($pid)" >&2
    fi
    rm -f "$pidfile"
}

if [[ ${1:-} == --node ]]; then
    # unshare --kill-child: the node's init, slurmd and all its tasks die with the unshare process
    stop "$DIR/run/node-$2.pid" "node $2" KILL
    exit 0
fi

for pidfile in "$DIR"/run/node-*.pid; do
    [[ -e $pidfile ]] || continue
    node=${pidfile##*/node-}
    stop "$pidfile" "node ${node%.pid}"
done
stop "$DIR/run/slurmctld.pid" slurmctld
stop "$DIR/munge/munged.pid" munged

if [[ ${1:-} == --purge ]]; then
    rm -rf "$DIR"
    echo "slurm-mn: removed $DIR" >&2
fi
exit 0
