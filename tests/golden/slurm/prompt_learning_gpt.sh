#!/usr/bin/env bash
# promptlaunch stage 'prompt_learning', job 'squad_gpt3_5b', executor 'slurm'.
# Config: /mount/results/gpt3_5b/prompt_learning_squad/squad_gpt3_5b_hydra-<digest>.yaml
# Rerun by hand: sbatch /mount/results/gpt3_5b/prompt_learning_squad/squad_gpt3_5b_slurm.sh
# The launcher adds --dependency=afterok:<previous stage's job id>,singleton when it submits the chain.
#SBATCH --error=/mount/results/gpt3_5b/prompt_learning_squad/log-squad_gpt3_5b_%j.err
#SBATCH --exclusive
#SBATCH --gpus-per-node=8
#SBATCH --job-name=promptlaunch-squad_gpt3_5b
#SBATCH --kill-on-invalid-dep=yes
#SBATCH --mem=0
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --open-mode=append
#SBATCH --output=/mount/results/gpt3_5b/prompt_learning_squad/log-squad_gpt3_5b_%j.out
#SBATCH --requeue
#SBATCH --signal=USR1@120
#SBATCH --time=04:00:00
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
asked=/mount/results/gpt3_5b/prompt_learning_squad/.requeue-asked-"$SLURM_JOB_ID"
if (( ${SLURM_RESTART_COUNT:-0} > 0 )) && ! rm "$asked" 2>/dev/null; then
    why="promptlaunch: job $SLURM_JOB_ID was restarted by Slurm, not by the stage: a node of its previous run failed (or an administrator requeued it); cluster.node_failure=fail, so it fails now and Slurm cancels its dependants. Rerun the same command once the nodes are back: prompt_learning resumes from its last checkpoint (cluster.node_failure=requeue restarts on the nodes left instead)"
    echo "$why"; echo "$why" >&2
    exit 1
fi
# Preemption: Slurm sends SIGUSR1 to every srun task 120 s before the time limit (also: scancel --signal=USR1 <job id>). The stage saves a checkpoint at its next step boundary, creates $PROMPTLAUNCH_REQUEUE_FILE and exits; this script then requeues the job, which resumes from the checkpoint (exp_manager.resume_if_exists).
export PROMPTLAUNCH_PREEMPT_SIGNAL=USR1
export PROMPTLAUNCH_REQUEUE_FILE=/mount/results/gpt3_5b/prompt_learning_squad/.requeue-"$SLURM_JOB_ID"
rm -f "$PROMPTLAUNCH_REQUEUE_FILE"
rc=0
srun --kill-on-bad-exit=1 --nodes=1 --ntasks-per-node=8 python3 -u /opt/promptlaunch/stages/prompt_learning/run.py --config /mount/results/gpt3_5b/prompt_learning_squad/squad_gpt3_5b_hydra-<digest>.yaml || rc=$?
if [[ -e $PROMPTLAUNCH_REQUEUE_FILE ]]; then
    rm -f "$PROMPTLAUNCH_REQUEUE_FILE"
    echo "promptlaunch: requeueing job $SLURM_JOB_ID; it resumes from its checkpoint"
    touch "$asked"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$rc"
