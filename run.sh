#!/usr/bin/env bash
# speedchat, start to end: bash run.sh [cpu|smoke|d12|speedrun|rehearsal]
#   cpu       (default on a machine without a GPU) the offline toy world on CPU: tokenizer, a tiny
#             GPT, mid + SFT, RL, evals, report. No network.
#   smoke     the cpu preset shortened to a couple of minutes: checks that everything runs.
#   d12       one GPU, a quick research run on ClimbMix.
#   speedrun  8 GPUs, the race to GPT-2 grade CORE.
#   rehearsal the d12/speedrun path on CPU at toy sizes, against local stand-ins of every remote
#             source (under a minute on 2 cores): what a GPU run would trip on, found before renting one.
# Re-runnable: a stage whose report section exists is skipped; one with checkpoints resumes.
set -euo pipefail
cd "$(dirname "$0")"

# ---- environment: a venv with the runtime dependencies (a CPU torch wheel when none is installed);
# SPEEDCHAT_PYTHON=/path/to/python uses that interpreter as it is instead (the end-to-end test does)
PY="${SPEEDCHAT_PYTHON:-.venv/bin/python}"
if [ -z "${SPEEDCHAT_PYTHON:-}" ]; then
  if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
  if ! $PY -c "import torch" 2>/dev/null; then
    .venv/bin/pip install -q torch==2.13.0 2>/dev/null || .venv/bin/pip install -q torch
  fi
  # installed once; after that run.sh needs no network for the cpu preset
  $PY -c "import numpy, tiktoken, requests, flask, pyarrow, waitress, yaml" 2>/dev/null || .venv/bin/pip install -q -e .
fi
HOME_DEFAULT="$HOME/.cache/speedchat"
if [ "${1:-}" = rehearsal ]; then HOME_DEFAULT+=-rehearsal; fi  # a rehearsal's tokenizer never meets a real run
export SPEEDCHAT_HOME="${SPEEDCHAT_HOME:-$HOME_DEFAULT}"
mkdir -p "$SPEEDCHAT_HOME"
PRESET="${1:-}"
if [ -z "$PRESET" ]; then  # counting GPUs imports torch (seconds): only when there is a preset to pick
  GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
  if [ "$GPUS" -gt 0 ]; then
    echo "This machine has $GPUS GPU(s). Pick a preset: bash run.sh d12 (1 GPU) | speedrun (8 GPUs) | cpu (the offline toy world)"
    exit 1
  fi
  PRESET=cpu
fi

done_stage() { [ -f "$SPEEDCHAT_HOME/report/$1.json" ]; }
has_metric() { $PY -c "import json, sys; sys.exit('$2' not in json.load(open(sys.argv[1])))" "$SPEEDCHAT_HOME/report/$1.json" 2>/dev/null; }
resume_flag() { if ls "$SPEEDCHAT_HOME/checkpoints/$1/$2"/step_* >/dev/null 2>&1; then echo --resume; fi; }
stage() { echo; echo "=== $* ($(date +%H:%M:%S))"; }
T0=$(date +%s)

case "$PRESET" in
cpu|smoke)
  # Sized for 2 cores: a ~1M-parameter GPT sees the toy world's 2.5M characters a few times in
  # pretraining; mid and SFT teach the chat format, facts questions and the calculator; RL sharpens
  # the arithmetic. Each stage prints progress; report.md shows what each one learned.
  # smoke: the same stages, shortened to under 2 minutes (the end-to-end test in tests/ runs it): half the
  # pretraining batch, 30 chat steps (val bpb 0.28, SFT ToyMath 0.62 against 0.00 on 2 cores).
  DATA=toy; TAG=toy; TOY_TASKS=ToyFacts,ToyMath,ToySpell
  if [ "$PRESET" = cpu ]; then BASE_STEPS=600 BASE_BATCH=4096 CHAT_STEPS=-1 RL_STEPS=120 EVAL_ITEMS=-1 RL_EVAL=200
  else BASE_STEPS=120 BASE_BATCH=2048 CHAT_STEPS=30 RL_STEPS=8 EVAL_ITEMS=50 RL_EVAL=50; fi
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # a ~1M-parameter model is fastest on one thread
  stage "tokenizer on the toy world"
  [ -f "$SPEEDCHAT_HOME/tokenizer/tokenizer.json" ] || $PY tok.py train --data $DATA --vocab-size 4096
  stage "pretraining"
  done_stage base || $PY train.py --data $DATA --tag $TAG --depth 2 --aspect-ratio 64 --head-dim 64 \
      --max-seq-len 256 --device-batch-size $(( BASE_BATCH / 256 )) --total-batch-size $BASE_BATCH --num-iterations $BASE_STEPS \
      --eval-every 100 --eval-tokens 32768 --sample-every 0 --core-metric-every 0 --save-every 200 \
      --warmup-ratio 0.02 $(resume_flag base $TAG)
  stage "the base model on the toy chat tasks (the report's baseline)"
  has_metric base ToyMath || $PY evals.py chat --source base --tag $TAG -a $TOY_TASKS --max-problems $EVAL_ITEMS
  stage "midtraining"
  done_stage mid || $PY chat_sft.py --stage mid --mixture toy --model-tag $TAG --tag $TAG \
      --num-iterations $CHAT_STEPS --max-problems $EVAL_ITEMS $(resume_flag mid $TAG)
  stage "supervised finetuning"
  done_stage sft || $PY chat_sft.py --stage sft --mixture toy --model-tag $TAG --tag $TAG \
      --num-iterations $CHAT_STEPS --max-problems $EVAL_ITEMS $(resume_flag sft $TAG)
  stage "reinforcement learning on toy arithmetic"
  done_stage rl || $PY chat_rl.py --task toy --init-from sft --init-tag $TAG --tag $TAG --num-steps $RL_STEPS \
      --prompts-per-step 8 --samples-per-prompt 8 --eval-examples $RL_EVAL --eval-samples 4 --eval-every 40 $(resume_flag rl $TAG)
  ;;
d12|speedrun|rehearsal)
  # ClimbMix: about 250M characters a shard. d12 trains ~10.5 tokens per parameter on ~1.4B
  # tokens (24 shards); the speedrun's d24 wants ~7B tokens (~170 shards at ~4.3 bytes/token).
  # rehearsal: the same stages and commands at toy sizes on CPU, 2 gloo ranks, every remote source a
  # local stand-in (tests/standin.py) unless HF_ENDPOINT and SPEEDCHAT_CORE_URL already name one.
  # Its extra flags only shrink sizes; the variables that carry them are empty for the real presets.
  TORCHRUN="$PY -m torch.distributed.run --standalone"  # the venv's own torchrun, activated or not
  case "$PRESET" in
  # FIRST: shards fetched before the tokenizer starts; it reads only what is on disk, so they must hold
  # its 2B characters (8 shards hold about that, 10 surely), or it would depend on the download's pace
  d12) SHARDS=24; FIRST=10; DEPTH=12; NPROC=1 ;;
  speedrun) SHARDS=180; FIRST=10; DEPTH=24; NPROC=8 ;;
  rehearsal)
    SHARDS=2; FIRST=1; DEPTH=2; NPROC=2
    export OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""  # CPU and gloo, whatever GPUs the machine has
    TOK_SIZE="--vocab-size 1024"; TOK_CHARS=100000  # within the first shard (105K characters)
    BASE_SIZE="--aspect-ratio 32 --head-dim 32 --max-seq-len 128 --device-batch-size 4 --total-batch-size 1024
      --target-param-data-ratio 0.15 --eval-every 12 --eval-tokens 8192 --sample-every 12 --core-metric-max-per-task 4"
    CORE_EVERY=12
    CHAT_SIZE="--num-iterations 3 --device-batch-size 4 --max-problems 4 --max-new-tokens 48"
    MID_SIZE="--total-batch-size 1024"; SFT_SIZE="--total-batch-size 8"
    if [ -z "${HF_ENDPOINT:-}" ]; then
      STANDIN_URL="$SPEEDCHAT_HOME/standin.url"; rm -f "$STANDIN_URL"
      $PY tests/standin.py --ready "$STANDIN_URL" --log "$SPEEDCHAT_HOME/standin.log" ${STANDIN_FLAGS:-} &
      STANDIN=$!; trap 'kill $STANDIN 2>/dev/null' EXIT
      for _ in $(seq 100); do [ -f "$STANDIN_URL" ] && break; sleep 0.1; done
      [ -f "$STANDIN_URL" ] || { echo "error: tests/standin.py did not start within 10 s"; exit 2; }
      export HF_ENDPOINT=$(cat "$STANDIN_URL") SPEEDCHAT_CORE_URL=$(cat "$STANDIN_URL")/eval_bundle.zip
      echo "stand-in for the Hugging Face Hub and the eval bundle: $HF_ENDPOINT"
    fi ;;
  esac
  TAG=d$DEPTH
  stage "data: the first shards now, the rest in the background while the tokenizer trains"
  $PY tok.py download -n $FIRST
  $PY tok.py download -n $SHARDS > "$SPEEDCHAT_HOME/download.log" 2>&1 &
  DL=$!
  stage "tokenizer (${TOK_CHARS:-2000000000} characters)"
  [ -f "$SPEEDCHAT_HOME/tokenizer/tokenizer.json" ] || $PY tok.py train --max-chars ${TOK_CHARS:-2000000000} ${TOK_SIZE:-}
  wait $DL || { echo "error: the background download failed ($SPEEDCHAT_HOME/download.log):"; tail -n 1 "$SPEEDCHAT_HOME/download.log"; exit 2; }
  stage "pretraining d$DEPTH on $NPROC rank(s)"
  done_stage base || $TORCHRUN --nproc_per_node=$NPROC train.py --depth $DEPTH --tag $TAG \
      --core-metric-every ${CORE_EVERY:-2000} ${BASE_SIZE:-} $(resume_flag base $TAG)
  stage "CORE over every item of every task: the leaderboard's figure (training's CORE is a subsample)"
  has_metric base CORE || $TORCHRUN --nproc_per_node=$NPROC evals.py core --source base --tag $TAG
  stage "midtraining"
  done_stage mid || $TORCHRUN --nproc_per_node=$NPROC chat_sft.py --stage mid --model-tag $TAG --tag $TAG \
      ${CHAT_SIZE:-} ${MID_SIZE:-} $(resume_flag mid $TAG)
  stage "supervised finetuning"
  done_stage sft || $TORCHRUN --nproc_per_node=$NPROC chat_sft.py --stage sft --model-tag $TAG --tag $TAG \
      ${CHAT_SIZE:-} ${SFT_SIZE:-} $(resume_flag sft $TAG)
  ;;
*)
  echo "unknown preset '$PRESET': use cpu, smoke, d12, speedrun or rehearsal"; exit 2 ;;
esac

stage "report"
$PY evals.py report
echo
echo "done in $(( ($(date +%s) - T0) / 60 )) min: $SPEEDCHAT_HOME/report/report.md"
SRC=$(case "$PRESET" in cpu|smoke) echo rl ;; *) echo sft ;; esac)
AT=""; if [ "$SPEEDCHAT_HOME" != "$HOME/.cache/speedchat" ]; then AT="SPEEDCHAT_HOME=$SPEEDCHAT_HOME "; fi
echo "chat with it:  $AT$PY engine.py chat --source $SRC   or   $AT$PY serve.py --source $SRC"
