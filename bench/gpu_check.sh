#!/usr/bin/env bash
# The GPU check: everything GPU-side in one run of at most 10 minutes, on the GPU machine as it is.
#
#   bash bench/gpu_check.sh [--out FILE] [--work DIR] [--data-dir DIR]
#   bash bench/gpu_check.sh --dry-run [--out FILE] [--work DIR]     # the same steps on CPU, to check the script
#
# It installs nothing and needs no network: it uses the CUDA-enabled torch and the packages already installed (and
# prints their versions), the embedded SmolLM2 (embedded:smollm2-135m-instruct) and the SQuAD files already prepared
# under --data-dir (default data/; without them the pipeline's data_preparation stage needs the network once).
# Steps, each under its own timeout (together at most 10 minutes):
#   versions        python, torch + CUDA/NCCL, the GPUs and their compute capability, transformers, peft, lightning,
#                   flash-attn, the repository's commit
#   equality_tests  the TP/PP/DP equality tests on NCCL, one rank per GPU (PROMPTLAUNCH_TEST_DEVICE=cuda): with one
#                   GPU the 1-process layout, with more every layout that fits; the others skip, with the reason
#   pipeline        data_preparation -> prompt_learning -> evaluation (main.py) with trainer.accelerator=gpu, shrunk
#                   to 100 steps and 200 questions
#   train_bench     bench/train_vs_peft.py --device cuda (bf16-true sides where the GPU computes bf16), sdpa attention
#   eval_bench      bench/eval_vs_peft.py --device cuda --precision auto, sdpa attention
# and writes ONE JSON (default bench/results/gpu_check.json): every step's command, exit code, seconds and key
# results, the versions and the machine; written atomically at the end. Logs and step outputs stay in --work.
# Exit code: 0 when every step passed, 1 when one failed (the JSON says which), 2 when there is no CUDA device
# (one line on stderr, nothing written).
# --dry-run: the same steps and code paths on CPU (gloo, fp32, the tiny random Llama, the tiny SQuAD fixture, one
# process), in a minute or two; the JSON says "mode": "cpu-dry-run" and that nothing in it is a GPU measurement.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT="$ROOT/bench/results/gpu_check.json"
WORK=""
DATA="$ROOT/data"
DRY=0
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }   # paths given relative to the caller
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$(absolute "$2")"; shift ;;
    --work) WORK="$(absolute "$2")"; shift ;;
    --data-dir) DATA="$(absolute "$2")"; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
cd "$ROOT"

# offline: nothing is downloaded or installed
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PIP_NO_INDEX=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

# refuse before anything is written (exit 2, one line on stderr); else the processes the equality tests may start
if [ "$DRY" = 1 ]; then RANKS="$("$PY" bench/gpu_env.py check --dry-run)"; else RANKS="$("$PY" bench/gpu_env.py check)"; fi

START=$(date +%s%N)
WORK="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}"
mkdir -p "$WORK"
rm -f "$WORK/steps.tsv"

# step NAME TIMEOUT_SECONDS COMMAND...: run it under timeout, log to $WORK/NAME.log, record exit code and milliseconds
step() {
  local name="$1" limit="$2"; shift 2
  local t0 t1 rc
  echo "== $name (timeout ${limit}s): $*"
  t0=$(date +%s%N)
  set +e
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  t1=$(date +%s%N)
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( (t1 - t0) / 1000000 ))" "$limit" "$*" >> "$WORK/steps.tsv"
  echo "== $name: exit $rc"
}

if [ "$DRY" = 1 ]; then
  MODE=cpu-dry-run DEVICE=cpu ACCEL=cpu
  DATA="$WORK/data"
  MODEL="$WORK/llama_tiny_random"
  PIPELINE=(data_preparation.source=local "data_preparation.local_dir=$ROOT/tests/fixtures/squad_tiny"
            data_preparation.sha256.train=null data_preparation.sha256.dev=null
            data_preparation.expected_counts.train=null data_preparation.expected_counts.dev=null
            "prompt_learning.model.language_model_path=$MODEL" prompt_learning.run.model_train_name=llama_tiny_random
            prompt_learning.trainer.precision=32
            evaluation.trainer.precision=32 prompt_learning.model.global_batch_size=2 prompt_learning.model.micro_batch_size=2
            prompt_learning.trainer.max_steps=2 prompt_learning.trainer.val_check_interval=2
            evaluation.data.offset=0 evaluation.data.max_examples=5)
  TRAIN=(--batches 1 --batch-size 2 --repeats 1 --init random --max-seq-length 512 --bf16 off)
  EVAL=(--batches 1 --batch-size 2 --repeats 1 --init random --tokens-to-generate 4 --precision 32)
  step tiny_model 60 "$PY" -m tests.support.tiny_models llama "$MODEL"
else
  MODE=gpu DEVICE=cuda ACCEL=gpu
  MODEL=embedded:smollm2-135m-instruct
  PIPELINE=(prompt_learning.trainer.max_steps=100 prompt_learning.trainer.val_check_interval=50
            evaluation.data.max_examples=200)
  TRAIN=(--batches 2 --batch-size 8 --repeats 3 --bf16 auto)
  EVAL=(--batches 3 --batch-size 8 --repeats 3 --precision auto)
fi
echo "gpu_check: mode $MODE, work folder $WORK, $RANKS rank(s) for the equality tests"

step versions 45 "$PY" bench/gpu_env.py versions --out "$WORK/versions.json"

step equality_tests 255 env PROMPTLAUNCH_TEST_DEVICE="$DEVICE" PROMPTLAUNCH_TEST_MAX_RANKS="$RANKS" \
  "$PY" -m pytest -q -rs -p no:cacheprovider -m dist --basetemp="$WORK/pytest" --junitxml="$WORK/equality_tests.xml" \
  tests/stages/prompt_learning/test_parallel_dist.py tests/stages/prompt_learning/test_parallel_lightning.py \
  tests/stages/prompt_learning/test_prompt_learning_parallel.py

step pipeline 180 "$PY" main.py "base_results_dir=$WORK/results" "data_dir=$DATA" \
  "prompt_learning.trainer.accelerator=$ACCEL" "evaluation.trainer.accelerator=$ACCEL" \
  prompt_learning.trainer.enable_progress_bar=false "${PIPELINE[@]}"

step train_bench 60 "$PY" bench/train_vs_peft.py --device "$DEVICE" --model "$MODEL" --data-dir "$DATA" --attn sdpa \
  --no-compile "${TRAIN[@]}" --out "$WORK/train_bench.json"

step eval_bench 45 "$PY" bench/eval_vs_peft.py --device "$DEVICE" --model "$MODEL" --data-dir "$DATA" --attn sdpa \
  "${EVAL[@]}" --out "$WORK/eval_bench.json"

"$PY" bench/gpu_env.py report --work "$WORK" --mode "$MODE" --out "$OUT" --milliseconds "$(( ($(date +%s%N) - START) / 1000000 ))"
awk -F'\t' '$2 != 0 { failed = 1 } END { exit failed }' "$WORK/steps.tsv" || exit 1
