#!/usr/bin/env bash
# The tests: creates .venv if needed, installs speedchat with its dev extras (a CPU torch wheel),
# tries to get Debian's chromium for the chat page's browser test (skipped without it), runs pytest.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q torch==2.13.0 2>/dev/null || .venv/bin/pip install -q torch
fi
.venv/bin/pip install -q -e '.[dev]'
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (timeout 300 apt-get update -qq && timeout 300 apt-get install -y -qq chromium) >/dev/null 2>&1 \
    || echo "note: chromium not installed; the browser test will be skipped"
fi
exec .venv/bin/python -m pytest -n auto --dist worksteal "$@"  # every core; conftest.py orders the heaviest first
