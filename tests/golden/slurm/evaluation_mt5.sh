#!/usr/bin/env bash
# promptlaunch stage 'evaluation', job 'eval_prompt_squad_mt5_390m', executor 'slurm'.
# Config: /mount/results/mt5_390m/evaluation_squad/eval_prompt_squad_mt5_390m_hydra-<digest>.yaml
# Rerun by hand: sbatch /mount/results/mt5_390m/evaluation_squad/eval_prompt_squad_mt5_390m_slurm.sh
# The launcher adds --dependency=afterok:<previous stage's job id>,singleton when it submits the chain.
#SBATCH --error=/mount/results/mt5_390m/evaluation_squad/log-eval_prompt_squad_mt5_390m_%j.err
#SBATCH --exclusive
#SBATCH --gpus-per-node=1
#SBATCH --job-name=promptlaunch-eval_prompt_squad_mt5_390m
#SBATCH --mem=0
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=/mount/results/mt5_390m/evaluation_squad/log-eval_prompt_squad_mt5_390m_%j.out
#SBATCH --requeue
#SBATCH --time=04:00:00
set -euo pipefail
cd /opt/promptlaunch
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
# rank, world size and local rank come from srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID);
# the rendezvous address and port are the ones Lightning's SLURMEnvironment derives.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR MASTER_PORT=$((15000 + SLURM_JOB_ID % 10000))
srun --kill-on-bad-exit=1 --nodes=1 --ntasks-per-node=1 python3 -u /opt/promptlaunch/stages/evaluation/run.py --config /mount/results/mt5_390m/evaluation_squad/eval_prompt_squad_mt5_390m_hydra-<digest>.yaml
