#!/usr/bin/env bash
# promptlaunch stage 'prompt_learning', job 'squad_gpt3_5b', executor 'bcp'.
# Config: /mount/results/gpt3_5b/prompt_learning_squad/squad_gpt3_5b_hydra-<digest>.yaml
# Rerun by hand: bash /mount/results/gpt3_5b/prompt_learning_squad/squad_gpt3_5b_bcp.sh (inside the BCP job)
set -euo pipefail
cd /opt/launcher
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
bcprun --nnodes 1 --npernode 8 -no_redirect --workdir /opt/launcher \
  --env "PYTHONUNBUFFERED=${PYTHONUNBUFFERED}" \
  --env "TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM}" \
  --env LOCAL_WORLD_SIZE=8 \
  --cmd 'python3 -u /opt/launcher/stages/prompt_learning/run.py --config /mount/results/gpt3_5b/prompt_learning_squad/squad_gpt3_5b_hydra-<digest>.yaml' \
  2>&1 | tee -a /mount/results/gpt3_5b/prompt_learning_squad/log-squad_gpt3_5b.out
