#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine for the @pytest.mark.slurm tests (idempotent).
#
# Usage:
#   bash .ci/slurm/start.sh            # installs slurm-wlm + munge if missing, starts munged/slurmctld/slurmd
#   source /tmp/promptlaunch-slurm/env.sh   # sets SLURM_CONF; then: python3 -m pytest -m slurm
#   bash .ci/slurm/stop.sh             # stops what this script started
#
# Everything (config, munge key and socket, state, logs, pid files) lives under $PROMPTLAUNCH_SLURM_DIR
# (default /tmp/promptlaunch-slurm); nothing in /etc is changed. No systemd, no slurmdbd: jobs are
# watched with squeue/scontrol, finished jobs are also recorded by jobcomp/filetxt (sacct -c).
set -euo pipefail

DIR=${PROMPTLAUNCH_SLURM_DIR:-/tmp/promptlaunch-slurm}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

log() { echo "slurm-ci: $*" >&2; }

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_state() { sinfo --noheader --nodes=localhost --format=%T 2>/dev/null | head -n1 || true; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    log "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq slurm-wlm munge >/dev/null
fi

mkdir -p "$DIR"/{log,state/ctld,state/d,run,munge}
chmod 0755 "$DIR" "$DIR/log" "$DIR/run"

# --- munge: own key and socket (socket dir 0755 so every user reaches it; key 0400 owned by munge) ---
MUNGE_SOCKET=$DIR/munge/munge.socket.2
if ! alive "$DIR/munge/munged.pid"; then
    if [[ ! -s $DIR/munge/munge.key ]]; then
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1 count=1024 status=none
    fi
    chown -R munge:munge "$DIR/munge"
    chmod 0755 "$DIR/munge"
    chmod 0400 "$DIR/munge/munge.key"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    runuser -u munge -- munged --force \
        --key-file="$DIR/munge/munge.key" --socket="$MUNGE_SOCKET" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
    log "munged started"
fi

# --- slurm.conf (rewritten only when missing, so a running cluster keeps its config) ---
if [[ ! -s $CONF ]]; then
    cat >"$CONF" <<EOF
# One-node test cluster for promptlaunch CI, written by .ci/slurm/start.sh.
ClusterName=promptlaunch-ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: how long a requeued job is held before it may start again (default 120 s); slurmd refuses
# to start it earlier ("Job credential revoked"), so the requeue test waits this long, not 2 minutes
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=${PROMPTLAUNCH_SLURMCTLD_PORT:-6817}
SlurmdPort=${PROMPTLAUNCH_SLURMD_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
MinJobAge=600
KillWait=5
InactiveLimit=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
fi

if ! alive "$DIR/run/slurmctld.pid"; then
    slurmctld -i
    log "slurmctld started"
fi
for _ in $(seq 50); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
if ! alive "$DIR/run/slurmd.pid"; then
    slurmd -N localhost
    log "slurmd started"
fi

state=""
for _ in $(seq 100); do
    state=$(node_state)
    case $state in
        idle*|mixed*|allocated*|completing*) break ;;
        down*|drain*|drained*) scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
done
case $state in
    idle*|mixed*|allocated*|completing*) ;;
    *) log "node did not come up (state '$state'); logs: $DIR/log"; tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true; exit 1 ;;
esac

echo "export SLURM_CONF=$CONF" >"$DIR/env.sh"
log "ready: node localhost is $state; logs in $DIR/log (slurmctld.log, slurmd.log, jobcomp.txt) and $DIR/munge/munged.log"
log "use it with: source $DIR/env.sh   (sets SLURM_CONF=$CONF)"
