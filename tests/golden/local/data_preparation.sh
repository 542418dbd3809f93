#!/usr/bin/env bash
# promptlaunch stage 'data_preparation', job 'download_squad', executor 'local'.
# Config: /TMP/results/data_preparation/download_squad_hydra-<digest>.yaml
# Rerun by hand: bash /TMP/results/data_preparation/download_squad_local.sh
set -euo pipefail
cd /opt/promptlaunch
export HF_HUB_OFFLINE=1
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
exec python3 -u /opt/promptlaunch/stages/data_preparation/run.py --config /TMP/results/data_preparation/download_squad_hydra-<digest>.yaml
