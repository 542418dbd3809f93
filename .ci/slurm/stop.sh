#!/usr/bin/env bash
# Stop the test Slurm started by .ci/slurm/start.sh (slurmd, slurmctld, munged, by their pid files).
# Usage: bash .ci/slurm/stop.sh [--purge]     # --purge also deletes config, state and logs
set -uo pipefail

DIR=${PROMPTLAUNCH_SLURM_DIR:-/tmp/promptlaunch-slurm}

stop() {  # stop <pid file> <name>: TERM, wait up to 10 s, then KILL
    local pidfile=$1 name=$2 pid
    [[ -s $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
        echo "slurm-ci: stopped $name ($pid)" >&2
    fi
    rm -f "$pidfile"
}

stop "$DIR/run/slurmd.pid" slurmd
stop "$DIR/run/slurmctld.pid" slurmctld
stop "$DIR/munge/munged.pid" munged

if [[ ${1:-} == --purge ]]; then
    rm -rf "$DIR"
    echo "slurm-ci: removed $DIR" >&2
fi
exit 0
