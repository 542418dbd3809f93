#!/usr/bin/env bash
# promptlaunch stage 'prompt_learning', job 'squad_t5_220m', executor 'bcp'.
# Config: /mount/results/t5_220m/prompt_learning_squad/squad_t5_220m_hydra-<digest>.yaml
# Rerun by hand: bash /mount/results/t5_220m/prompt_learning_squad/squad_t5_220m_bcp.sh (inside the BCP job)
set -euo pipefail
cd /opt/promptlaunch
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
bcprun --nnodes 1 --npernode 8 -no_redirect --workdir /opt/promptlaunch \
  --env "PYTHONUNBUFFERED=${PYTHONUNBUFFERED}" \
  --env "TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM}" \
  --env LOCAL_WORLD_SIZE=8 \
  --cmd 'python3 -u /opt/promptlaunch/stages/prompt_learning/run.py --config /mount/results/t5_220m/prompt_learning_squad/squad_t5_220m_hydra-<digest>.yaml' \
  2>&1 | tee -a /mount/results/t5_220m/prompt_learning_squad/log-squad_t5_220m.out
