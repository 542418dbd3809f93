#!/usr/bin/env bash
# Start a three-node Slurm cluster on this one machine for the @pytest.mark.multinode tests (idempotent).
#
# Usage:
#   bash .ci/slurm/start-multinode.sh                # installs slurm-wlm + munge if missing, starts the cluster
#   source /tmp/promptlaunch-slurm-mn/env.sh         # sets PROMPTLAUNCH_MULTINODE_SLURM_CONF; then:
#   python3 -m pytest -m multinode
#   bash .ci/slurm/stop-multinode.sh                 # stops what this script started
#
# Each node is a slurmd in its own namespaces (unshare --uts --mount --pid): its own hostname (pln1, pln2, pln3),
# its own loopback address (127.0.0.11, 127.0.0.12, 127.0.0.13: the whole 127.0.0.0/8 is local, no interface is
# configured), its own spool, pid and log folder, and a hosts file mounted over /etc/hosts inside the node only
# (nothing in /etc is changed). Debian's slurmd is built without --enable-multiple-slurmd, hence the namespaces.
# Killing a node's namespace (stop-multinode.sh --node plnN) kills its slurmd and every task on it, like a
# node losing power. The controller (slurmctld, port 6827) and munged run in the root namespaces, apart from the
# one-node cluster of start.sh (port 6817): both can run at once. Everything lives under
# $PROMPTLAUNCH_SLURM_MN_DIR (default /tmp/promptlaunch-slurm-mn). Traffic stays on 127.0.0.0/8.
set -euo pipefail

DIR=${PROMPTLAUNCH_SLURM_MN_DIR:-/tmp/promptlaunch-slurm-mn}
# three nodes: the two-node jobs of the tests, and a spare that takes over when a test kills one of them
NODES=${PROMPTLAUNCH_SLURM_MN_NODES:-3}
CTLD_PORT=${PROMPTLAUNCH_SLURM_MN_CTLD_PORT:-6827}
NODE_PORT=${PROMPTLAUNCH_SLURM_MN_NODE_PORT:-6831}   # node i listens on NODE_PORT + i - 1
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

log() { echo "slurm-mn: $*" >&2; }
alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
node_name() { echo "pln$1"; }
node_addr() { echo "127.0.0.$((10 + $1))"; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v unshare >/dev/null; then
    log "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq slurm-wlm munge util-linux >/dev/null
fi
if ! unshare --uts --mount --pid --fork --mount-proc true 2>/dev/null; then
    log "cannot create UTS/mount/PID namespaces here (unshare needs root); the multinode tests will skip"
    exit 1
fi

mkdir -p "$DIR"/{log,state/ctld,run,munge,node}
chmod 0755 "$DIR" "$DIR/log" "$DIR/run"
for i in $(seq "$NODES"); do mkdir -p "$DIR/nodes/$(node_name "$i")"/{spool,log,run}; done

# --- munge: own key and socket ---
MUNGE_SOCKET=$DIR/munge/munge.socket.2
if ! alive "$DIR/munge/munged.pid"; then
    [[ -s $DIR/munge/munge.key ]] || dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1 count=1024 status=none
    chown -R munge:munge "$DIR/munge"
    chmod 0755 "$DIR/munge"
    chmod 0400 "$DIR/munge/munge.key"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    runuser -u munge -- munged --force \
        --key-file="$DIR/munge/munge.key" --socket="$MUNGE_SOCKET" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
    log "munged started"
fi

# --- the hosts file the nodes see as /etc/hosts: this machine's entries, then the nodes ---
{
    grep -v ' # promptlaunch-mn$' /etc/hosts || true
    for i in $(seq "$NODES"); do echo "$(node_addr "$i") $(node_name "$i") # promptlaunch-mn"; done
} >"$DIR/hosts"

# --- slurm.conf (rewritten only when missing, so a running cluster keeps its config) ---
if [[ ! -s $CONF ]]; then
    {
        cat <<EOF
# $NODES-node test cluster on one machine for promptlaunch CI, written by .ci/slurm/start-multinode.sh.
ClusterName=promptlaunch-mn
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: how long a requeued job is held before it may start again (default 120 s)
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$DIR/state/ctld
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmctldPort=$CTLD_PORT
# per node, inside its mount namespace, $DIR/node is its own $DIR/nodes/<name>
SlurmdSpoolDir=$DIR/node/spool
SlurmdPidFile=$DIR/node/run/slurmd.pid
SlurmdLogFile=$DIR/node/log/slurmd.log
SlurmdPort=$NODE_PORT
# a node that stops answering is DOWN after this many seconds (default 300)
SlurmdTimeout=20
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
EOF
        for i in $(seq "$NODES"); do
            echo "NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") Port=$((NODE_PORT + i - 1)) CPUs=$(nproc) State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=pln[1-$NODES] Default=YES MaxTime=INFINITE State=UP"
    } >"$CONF"
fi

if ! alive "$DIR/run/slurmctld.pid"; then
    slurmctld -i
    log "slurmctld started"
fi
for _ in $(seq 50); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done

# --- one slurmd per node, each in its own UTS + mount + PID namespace. unshare --kill-child: when the unshare
# process dies the node's init dies, and with it every process of the node (its pid file is the node's "power") ---
for i in $(seq "$NODES"); do
    name=$(node_name "$i")
    if alive "$DIR/run/node-$name.pid"; then continue; fi
    rm -f "$DIR/nodes/$name/run/slurmd.pid"
    setsid unshare --uts --mount --pid --fork --kill-child --mount-proc --propagation private \
        bash "$(dirname "$(readlink -f "$0")")/multinode-node.sh" "$name" "$DIR" \
        >>"$DIR/nodes/$name/log/init.log" 2>&1 </dev/null &
    echo $! >"$DIR/run/node-$name.pid"
    log "node $name ($(node_addr "$i"):$((NODE_PORT + i - 1))) started"
done

pending=""
for _ in $(seq 150); do
    pending=""
    for i in $(seq "$NODES"); do
        name=$(node_name "$i")
        state=$(sinfo --noheader --nodes="$name" --format=%T 2>/dev/null | head -n1 || true)
        case $state in
            idle*|mixed*|allocated*|completing*) ;;
            down*|drain*|drained*) scontrol update nodename="$name" state=resume >/dev/null 2>&1 || true; pending+=" $name:$state" ;;
            *) pending+=" $name:${state:-none}" ;;
        esac
    done
    [[ -z $pending ]] && break
    sleep 0.2
done
if [[ -n $pending ]]; then
    log "nodes did not come up:$pending; logs: $DIR/log, $DIR/nodes/*/log"
    tail -n 20 "$DIR/log/slurmctld.log" "$DIR"/nodes/*/log/*.log >&2 || true
    exit 1
fi

echo "export PROMPTLAUNCH_MULTINODE_SLURM_CONF=$CONF" >"$DIR/env.sh"
log "ready: $(sinfo --noheader --format='%D nodes %N %T' | tr '\n' ' '); logs in $DIR/log and $DIR/nodes/<node>/log"
log "use it with: source $DIR/env.sh   (sets PROMPTLAUNCH_MULTINODE_SLURM_CONF=$CONF; the tests point SLURM_CONF at it)"
