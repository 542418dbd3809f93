#!/usr/bin/env bash
# promptlaunch stage 'prompt_learning', job 'squad_mt5_390m', executor 'bcp'.
# Config: /mount/results/mt5_390m/prompt_learning_squad/squad_mt5_390m_hydra-<digest>.yaml
# Rerun by hand: bash /mount/results/mt5_390m/prompt_learning_squad/squad_mt5_390m_bcp.sh (inside the BCP job)
set -euo pipefail
cd /opt/promptlaunch
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
bcprun --nnodes 1 --npernode 8 -no_redirect --workdir /opt/promptlaunch \
  --env "PYTHONUNBUFFERED=${PYTHONUNBUFFERED}" \
  --env "TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM}" \
  --env LOCAL_WORLD_SIZE=8 \
  --cmd 'python3 -u /opt/promptlaunch/stages/prompt_learning/run.py --config /mount/results/mt5_390m/prompt_learning_squad/squad_mt5_390m_hydra-<digest>.yaml' \
  2>&1 | tee -a /mount/results/mt5_390m/prompt_learning_squad/log-squad_mt5_390m.out
