#!/usr/bin/env bash
# The whole pipeline, start to end. Until the later stages land it trains the tokenizer on a
# local corpus: $1 (a file or folder of .parquet/.jsonl/.txt) or, by default, this repository's
# own Python sources, which are always at hand offline.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/pip install -q torch==2.13.0 2>/dev/null || .venv/bin/pip install -q torch
.venv/bin/pip install -q -e .
export SPEEDCHAT_HOME="${SPEEDCHAT_HOME:-$HOME/.cache/speedchat}"
DATA="${1:-}"
if [ -z "$DATA" ]; then
  DATA="$SPEEDCHAT_HOME/demo_text"; mkdir -p "$DATA"
  for f in *.py tests/*.py; do cp "$f" "$DATA/$(basename "$f").txt"; done
fi
.venv/bin/python tok.py train --data "$DATA" --vocab-size 2048
.venv/bin/python tok.py eval --data "$DATA"
