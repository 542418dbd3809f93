#!/usr/bin/env bash
# promptlaunch stage 'evaluation', job 'eval_prompt_squad_t5_220m', executor 'bcp'.
# Config: /mount/results/t5_220m/evaluation_squad/eval_prompt_squad_t5_220m_hydra-<digest>.yaml
# Rerun by hand: bash /mount/results/t5_220m/evaluation_squad/eval_prompt_squad_t5_220m_bcp.sh (inside the BCP job)
set -euo pipefail
cd /opt/promptlaunch
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
bcprun --nnodes 1 --npernode 1 -no_redirect --workdir /opt/promptlaunch \
  --env "PYTHONUNBUFFERED=${PYTHONUNBUFFERED}" \
  --env "TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM}" \
  --env LOCAL_WORLD_SIZE=1 \
  --cmd 'python3 -u /opt/promptlaunch/stages/evaluation/run.py --config /mount/results/t5_220m/evaluation_squad/eval_prompt_squad_t5_220m_hydra-<digest>.yaml' \
  2>&1 | tee -a /mount/results/t5_220m/evaluation_squad/log-eval_prompt_squad_t5_220m.out
