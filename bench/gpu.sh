#!/usr/bin/env bash
# bench/gpu.sh: everything one GPU can show, sized for 8 minutes with compilation (bench/METHOD.md says
# what each figure is and how it is measured). No network needed.
#
#   bash bench/gpu.sh [--data PATH] [--out DIR] [--only step,step]   # one CUDA GPU
#   bash bench/gpu.sh --dry-run --data PATH                           # the same steps, tiny, on CPU (tests run it)
#
# --data: local text for the tokenizer and the 3-minute d12 race (a .jsonl(.gz)/.parquet/.txt file or
# folder; default ../shared/corpus/docs_corpus.jsonl.gz, else .bench_data/). --out: where the logs,
# gpu.json and the checkpoints go (default $OUT, else bench_out/). Steps, in order: tokenizer,
# train_d12, race_d12, decode_d20, core, train_d20, train_d24 (only while time is left). A step that
# fails prints its error and the rest still run; the table at the end marks it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${SPEEDCHAT_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
DRY=0; DATA=""; ONLY=""; OUTDIR="${OUT:-bench_out}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --data) DATA="$2"; shift ;;
    --out) OUTDIR="$2"; shift ;;
    --only) ONLY=",$2," ; shift ;;
    *) echo "bench/gpu.sh: unknown argument $1 (see the header of bench/gpu.sh)"; exit 2 ;;
  esac
  shift
done
if [ -z "$DATA" ]; then
  for d in ../shared/corpus/docs_corpus.jsonl.gz .bench_data; do [ -e "$d" ] && DATA="$d" && break; done
fi
mkdir -p "$OUTDIR"; OUTDIR="$(cd "$OUTDIR" && pwd)"
export SPEEDCHAT_HOME="$OUTDIR/home" PYTHONUNBUFFERED=1
T0=$(date +%s)
BUDGET=480           # seconds for everything; train_d24 runs only when enough of it is left
RACE_S=180           # the d12 race's training time
if [ "$DRY" = 1 ]; then
  DEV=cpu; VOCAB=512; CHARS=2000000; RACE_S=1
  TRAIN=(--device cpu --n-embd 128 --head-dim 64 --seq-len 64 --batch-size 2 --steps 2 --warmup 1)
  DEPTHS=(2 2 3); DECODE=(--depth 2 --n-embd 128 --prompt-len 16 --decode-tokens 8 --repeats 1)
  CORE=(--depth 2 --n-embd 128 --core-items 4 --cat-items 8 --gen-items 1 --max-new-tokens 4)
  RACE_B=2; RACE_T=64; RACE=(--n-embd 128 --n-head 2 --eval-tokens 512)
else
  DEV=cuda; VOCAB=32768; CHARS=50000000
  TRAIN=(--device cuda --steps 10 --warmup 2)
  DEPTHS=(12 20 24); DECODE=(--depth 20); CORE=(--depth 12 --n-embd 0 --core-items 256)
  RACE_B=32; RACE_T=2048; RACE=(--eval-tokens 262144)
fi

step() {  # step NAME CMD...: runs unless --only leaves it out; its log and last JSON line go to $OUTDIR
  local name=$1; shift
  if [ -n "$ONLY" ] && [[ "$ONLY" != *",$name,"* ]]; then return 0; fi
  echo; echo "=== $name ($(( $(date +%s) - T0 )) s): $*"
  "$@" 2>&1 | tee "$OUTDIR/$name.log"
  local rc=${PIPESTATUS[0]}
  local json; json=$(grep '^{' "$OUTDIR/$name.log" | tail -1)
  if [ "$rc" = 0 ]; then
    echo "${json:-"{}"}" > "$OUTDIR/$name.json"
  else
    "$PY" -c 'import json, sys; print(json.dumps({"error": f"exit status {sys.argv[1]}: " + sys.argv[2][-300:]}))' \
      "$rc" "$(tail -5 "$OUTDIR/$name.log")" > "$OUTDIR/$name.json"
    echo "=== $name FAILED (exit status $rc); going on"
  fi
}

race() {  # the d12 race: as many steps of 32 x 2048 tokens as train_d12's step time fits in RACE_S seconds
  local ms vocab iters
  vocab=$("$PY" -c 'import tok; print(tok.get_tokenizer().vocab_size)') || return 1
  ms=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["configs"][0]["ms"])' "$OUTDIR/train_d12.json") || {
    echo "race_d12 needs train_d12's step time"; return 1; }
  iters=$("$PY" -c 'import sys; print(max(2, int(float(sys.argv[1]) * 1000 / float(sys.argv[2]))))' "$RACE_S" "$ms")
  echo "vocab $vocab | train_d12: ${ms} ms a step -> $iters steps in ${RACE_S} s"
  "$PY" train.py --data "$DATA" --depth "${DEPTHS[0]}" "${RACE[@]}" --device-batch-size $RACE_B --max-seq-len $RACE_T \
      --total-batch-size $(( RACE_B * RACE_T )) \
      --num-iterations "$iters" --eval-every -1 --sample-every -1 --core-metric-every 0 --save-every -1 --keep-last 1 \
      --tag race --overwrite --device "$DEV" || return 1
  "$PY" -c 'import json, tok; r = json.load(open(tok.home() / "report" / "base.json"))
print(json.dumps({k: r.get(k) for k in ("val_bpb", "train_time_s", "num_iterations", "tokens", "tok_per_s", "mfu", "recompiles", "attention", "dtype")}))'
}

if [ -z "$DATA" ] || [ ! -e "$DATA" ]; then echo "bench/gpu.sh: no --data (${DATA:-none found}); tokenizer and race_d12 will fail"; fi
step tokenizer "$PY" tok.py train --data "${DATA:-none}" --vocab-size "$VOCAB" --max-chars "$CHARS"
V=$("$PY" -c 'import tok; print(tok.get_tokenizer().vocab_size)' 2>/dev/null || echo "$VOCAB")
step train_d12 "$PY" bench/train_bench.py "${TRAIN[@]}" --depth "${DEPTHS[0]}" --vocab-size "$V"   # race_d12's shapes: cached compile
step race_d12 race
step decode_d20 "$PY" bench/engine_bench.py --device "$DEV" "${DECODE[@]}"
step core "$PY" bench/evals_bench.py --device "$DEV" "${CORE[@]}"
step train_d20 "$PY" bench/train_bench.py "${TRAIN[@]}" --depth "${DEPTHS[1]}" --vocab-size "$V"
if [ $(( $(date +%s) - T0 )) -lt $(( BUDGET - 120 )) ]; then
  step train_d24 "$PY" bench/train_bench.py "${TRAIN[@]}" --depth "${DEPTHS[2]}" --vocab-size "$V"
else
  echo "=== train_d24 skipped: $(( $(date +%s) - T0 )) s of the ${BUDGET} s budget used"
fi

"$PY" - "$OUTDIR" "$(( $(date +%s) - T0 ))" "$DRY" <<'EOF'
import json, sys, time
from pathlib import Path
out, seconds, dry = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
order = ["tokenizer", "train_d12", "race_d12", "decode_d20", "core", "train_d20", "train_d24"]
steps = {n: json.loads((out / f"{n}.json").read_text()) for n in order if (out / f"{n}.json").exists()}
rows = []
def f(v, fmt, unit=""):
    return "-" if v is None else format(v, fmt) + unit
for name, r in steps.items():
    if "error" in r:
        rows.append((name, "FAILED: " + r["error"].replace("\n", " ")[:150]))
    elif name.startswith("train_d"):
        c = r["configs"][0]
        rows.append((name, f"{c['config']}: {c['tok_s']:,.0f} tok/s, {c['ms']:.0f} ms/step, MFU {f(c['mfu'], '.1f', '%')}, "
                           f"peak memory {f(c['peak_mem_gb'], '.1f', ' GB')}, compile {f(c['compile_s'], '.0f', ' s')}, {c['attention']}"))
    elif name == "race_d12":
        rows.append((name, f"val bpb {f(r['val_bpb'], '.4f')} after {f(r['train_time_s'], '.0f')} s of training "
                           f"({r['num_iterations']} steps, {r['tokens']:,} tokens, MFU {f(r['mfu'], '.1f', '%')}, recompiles {f(r['recompiles'], 'd')})"))
    elif name == "decode_d20":
        rows.append((name, f"batch 1: {r['decode_b1_tok_s']:,.1f} tok/s (floor {f(r.get('decode_b1_floor_tok_s'), ',.0f')}, "
                           f"{f(r.get('decode_b1_over_floor'), '.2f', 'x')} its time), batch 16: {r['decode_b16_tok_s']:,.1f} tok/s, {r['dtype']}"))
    elif name == "core":
        rows.append((name, f"{r['core_items_per_s']:,.1f} CORE items/s, {r['core_tokens_per_s']:,.0f} tokens/s (synthetic items)"))
    elif name == "tokenizer":
        rows.append((name, "trained (see tokenizer.log)"))
device = next((s.get("device") for s in steps.values() if s.get("device")), "?")
summary = {"device": device, "dry_run": dry, "date": time.strftime("%Y-%m-%d %H:%M"), "seconds": seconds, "steps": steps}
(out / "gpu.json").write_text(json.dumps(summary, indent=1))
print(f"\n## bench/gpu.sh{' --dry-run' if dry else ''}: {device}, {summary['date']}, {seconds} s\n")
print("| step | figures |\n| --- | --- |")
for name, text in rows:
    print(f"| {name} | {text} |")
print(f"\n{out / 'gpu.json'}")
EOF
