#!/usr/bin/env bash
# promptlaunch stage 'data_preparation', job 'download_squad', executor 'slurm'.
# Config: /mount/results/data_preparation/download_squad_hydra-<digest>.yaml
# Rerun by hand: sbatch /mount/results/data_preparation/download_squad_slurm.sh
# The launcher adds --dependency=afterok:<previous stage's job id>,singleton when it submits the chain.
#SBATCH --error=/mount/results/data_preparation/log-download_squad_%j.err
#SBATCH --exclusive
#SBATCH --job-name=promptlaunch-download_squad
#SBATCH --kill-on-invalid-dep=yes
#SBATCH --mem=0
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=/mount/results/data_preparation/log-download_squad_%j.out
#SBATCH --requeue
#SBATCH --time=01:00:00
set -euo pipefail
cd /opt/promptlaunch
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
# rank, world size and local rank come from srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID);
# the rendezvous address and port are the ones Lightning's SLURMEnvironment derives.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR MASTER_PORT=$((15000 + SLURM_JOB_ID % 10000))
echo "promptlaunch: job $SLURM_JOB_ID starts (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST"
# cluster.node_failure=fail: Slurm restarts a --requeue job whose node failed; a restart this script did not ask for (no marker) fails here, and Slurm cancels the dependants.
asked=/mount/results/data_preparation/.requeue-asked-"$SLURM_JOB_ID"
if (( ${SLURM_RESTART_COUNT:-0} > 0 )) && ! rm "$asked" 2>/dev/null; then
    why="promptlaunch: job $SLURM_JOB_ID was restarted by Slurm, not by the stage: a node of its previous run failed (or an administrator requeued it); cluster.node_failure=fail, so it fails now and Slurm cancels its dependants. Rerun the same command once the nodes are back: prompt_learning resumes from its last checkpoint (cluster.node_failure=requeue restarts on the nodes left instead)"
    echo "$why"; echo "$why" >&2
    exit 1
fi
srun --kill-on-bad-exit=1 --nodes=1 --ntasks-per-node=1 python3 -u /opt/promptlaunch/stages/data_preparation/run.py --config /mount/results/data_preparation/download_squad_hydra-<digest>.yaml
