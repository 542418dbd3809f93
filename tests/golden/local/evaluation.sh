#!/usr/bin/env bash
# promptlaunch stage 'evaluation', job 'eval_prompt_squad_smollm2_135m', executor 'local'.
# Config: /TMP/results/smollm2_135m/evaluation_squad/eval_prompt_squad_smollm2_135m_hydra-<digest>.yaml
# Rerun by hand: bash /TMP/results/smollm2_135m/evaluation_squad/eval_prompt_squad_smollm2_135m_local.sh
set -euo pipefail
cd /opt/promptlaunch
export HF_HUB_OFFLINE=1
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
exec python3 -u /opt/promptlaunch/stages/evaluation/run.py --config /TMP/results/smollm2_135m/evaluation_squad/eval_prompt_squad_smollm2_135m_hydra-<digest>.yaml
