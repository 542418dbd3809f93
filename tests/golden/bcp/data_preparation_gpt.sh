#!/usr/bin/env bash
# promptlaunch stage 'data_preparation', job 'download_squad', executor 'bcp'.
# Config: /mount/results/data_preparation/download_squad_hydra-<digest>.yaml
# Rerun by hand: bash /mount/results/data_preparation/download_squad_bcp.sh (inside the BCP job)
set -euo pipefail
cd /opt/promptlaunch
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
bcprun --nnodes 1 --npernode 1 -no_redirect --workdir /opt/promptlaunch \
  --env "PYTHONUNBUFFERED=${PYTHONUNBUFFERED}" \
  --env "TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM}" \
  --env LOCAL_WORLD_SIZE=1 \
  --cmd 'python3 -u /opt/promptlaunch/stages/data_preparation/run.py --config /mount/results/data_preparation/download_squad_hydra-<digest>.yaml' \
  2>&1 | tee -a /mount/results/data_preparation/log-download_squad.out
