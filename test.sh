#!/usr/bin/env bash
# Creates .venv if needed, installs speedchat with its dev extras (CPU torch), runs the tests.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/pip install -q torch==2.13.0 2>/dev/null || .venv/bin/pip install -q torch
.venv/bin/pip install -q -e '.[dev]'
exec .venv/bin/python -m pytest "$@"
