#!/usr/bin/env bash
# bench/peer_encodings.sh DIR: GPT-2's and GPT-4's encodings for `tok.py eval --encodings DIR`, from a
# package index alone (no access to openaipublic.blob.core.windows.net needed). No package made for the
# job ships them, but two carry them: openai-whisper's sdist holds GPT-2's ranks (whisper/assets/
# gpt2.tiktoken, byte for byte r50k_base.tiktoken) and litellm's wheel holds cl100k_base.tiktoken (under
# its tiktoken-cache name, the sha1 of its URL). tok.py checks both against tiktoken's sha256.
set -euo pipefail
OUT="${1:?usage: bash bench/peer_encodings.sh DIR}"
PY="${SPEEDCHAT_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download -q --no-deps --no-binary openai-whisper openai-whisper==20250625 -d "$TMP"
"$PY" -m pip download -q --no-deps --only-binary :all: litellm==1.110.2 -d "$TMP"
mkdir -p "$OUT"
"$PY" - "$TMP" "$OUT" <<'EOF'
import glob, sys, tarfile, zipfile
from pathlib import Path
tmp, out = sys.argv[1], Path(sys.argv[2])
with tarfile.open(glob.glob(f"{tmp}/openai_whisper-*.tar.gz")[0]) as t:
    member = next(m for m in t.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
    (out / "r50k_base.tiktoken").write_bytes(t.extractfile(member).read())
with zipfile.ZipFile(glob.glob(f"{tmp}/litellm-*.whl")[0]) as z:  # sha1 of cl100k_base.tiktoken's URL
    (out / "cl100k_base.tiktoken").write_bytes(z.read("litellm/litellm_core_utils/tokenizers/9b5ad71b2ce5302211f9c61530b329a4922fc6a4"))
print(f"wrote {out}/r50k_base.tiktoken and {out}/cl100k_base.tiktoken")
EOF
